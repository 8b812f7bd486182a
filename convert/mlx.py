"""Causal LM -> MLX through mlx-lm's own convert: float, affine 8/6/5/4/3/2-bit, or a mixed recipe."""

import contextlib
import io
from pathlib import Path

import mlx_lm

from edgeport import quantization
from edgeport.convert import Artifact
from edgeport.errors import EdgeportError
from edgeport.layouts import MLXModel
from edgeport.plan import Step
from edgeport.source import Source
from edgeport.targets import Target


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as an MLX model folder at `dest` (which must not exist), loadable by `mlx_lm.load`."""
    quant = quantization.get(step.quantization, "mlx")
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # mlx-lm prints its progress; we keep it for the record
            mlx_lm.convert(
                str(source.path),
                str(dest),
                quantize=not quant.is_float,
                q_bits=quant.bits,
                q_group_size=quant.group_size,
                dtype=quant.dtype,
                quant_predicate=quant.recipe,
                trust_remote_code=source.trust_remote_code,
            )
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # mlx-lm's model classes read the config as given
        raise EdgeportError(
            f"{source.ref}: mlx-lm {mlx_lm.__version__} could not convert it to {quant.name} "
            f"({type(e).__name__}: {e}); is config.json as its publisher wrote it?"
        ) from e
    return Artifact(
        format="mlx",
        quantization=quant.name,
        path=dest,
        engine=f"mlx-lm {mlx_lm.__version__}",
        layout=MLXModel(),
        details={"mlx_lm_log": log.getvalue().strip().splitlines()},
    )
