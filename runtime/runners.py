"""One runner per format: next-token logits for parity, and a streamed generate for the bench."""

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.errors import EdgeportError


@dataclass
class Token:
    """One streamed token and the engine's running figures."""

    text: str
    elapsed_s: float  # since generate was called
    prompt_tokens: int
    prompt_tps: float
    generated: int
    generation_tps: float
    peak_memory_gb: float


class TorchRunner:
    """The source in transformers on the CPU, float32: the parity reference."""

    engine = "transformers (torch, CPU, float32)"

    def __init__(self, source):
        import torch

        self.torch = torch
        self.model = source.load_reference()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids])).logits[0]
        return out.float().numpy()


class MLXRunner:
    """An MLX artifact through mlx-lm."""

    def __init__(self, path: Path, dequantize: bool = False):
        try:
            import mlx.core as mx
            import mlx_lm
        except ImportError as e:
            raise EdgeportError(f"running MLX artifacts needs mlx-lm: pip install 'edgeport[mlx]' ({e})") from e
        self.mx, self.mlx_lm = mx, mlx_lm
        self.model, self.tokenizer = mlx_lm.load(str(path))
        self.engine = f"mlx-lm {mlx_lm.__version__} ({mx.default_device()})"
        if dequantize:
            # Same weight values as the quantized model, computed in float32: what quantization did to
            # the weights, without MLX's CPU quantized kernels (minutes per forward pass on Linux).
            from mlx_lm.utils import dequantize_model

            self.model = dequantize_model(self.model)
            self.model.set_dtype(mx.float32)
            self.engine += ", weights dequantized to float32"

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self.model(self.mx.array([ids]))[0].astype(self.mx.float32)
        return np.array(out)

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        from mlx_lm.sample_utils import make_sampler

        self.mx.reset_peak_memory()
        start = time.perf_counter()
        for r in self.mlx_lm.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
        ):
            yield Token(
                r.text,
                time.perf_counter() - start,
                r.prompt_tokens,
                r.prompt_tps,
                r.generation_tokens,
                r.generation_tps,
                r.peak_memory,
            )


def parity_runner(artifact_format: str, path: Path, quantized: bool):
    """The runner parity uses for an artifact on this platform, and what that leaves unchecked here."""
    if artifact_format == "mlx":
        if sys.platform == "darwin":
            return MLXRunner(path), None
        if quantized:
            return MLXRunner(path, dequantize=True), (
                "MLX quantized kernels (off a Mac they take minutes per pass: the quantized weights were "
                "measured dequantized to float32 on MLX's CPU backend)"
            )
        return MLXRunner(path), "MLX on Metal (measured on MLX's CPU backend)"
    raise EdgeportError(f"no runner for {artifact_format} artifacts in this version")


def bench_runner(artifact_format: str, path: Path):
    if artifact_format == "mlx":
        return MLXRunner(path)
    raise EdgeportError(f"no runner for {artifact_format} artifacts in this version")
