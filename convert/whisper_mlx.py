"""Whisper -> the layout mlx-whisper loads: `config.json` with its ModelDimensions and `weights.safetensors` in its
own names (the layout's `weight_name`), float16 or affine-quantized.
"""

import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_whisper import whisper

from edgeport import quantization
from edgeport.convert import Artifact, copy_app_files
from edgeport.errors import EdgeportError
from edgeport.layouts import MLXWhisper
from edgeport.plan import Step
from edgeport.source import Source
from edgeport.targets import Target

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write Whisper `source` at `dest` (which must not exist) as an mlx-whisper model folder."""
    quant = quantization.get(step.quantization, "mlx")
    if quant.recipe:
        raise EdgeportError(f"MLX Whisper comes as fp16, bf16 or q8/q6/q5/q4/q3/q2, not the {quant.name} recipe")
    ours = source.family.dims(source.config)
    dims = whisper.ModelDimensions(
        n_mels=ours.mels,
        n_audio_ctx=ours.frames,
        n_audio_state=ours.d_model,
        n_audio_head=ours.encoder_heads,
        n_audio_layer=ours.encoder_layers,
        n_vocab=ours.vocab,
        n_text_ctx=ours.tokens,
        n_text_state=ours.d_model,
        n_text_head=ours.decoder_heads,
        n_text_layer=ours.decoder_layers,
    )
    dtype = DTYPES[quant.dtype]
    model = whisper.Whisper(dims, dtype)
    weights = mlx_weights(source.path, dtype)
    expected = {name for name, _ in tree_flatten(model.parameters())} - {"alignment_heads"}
    if set(weights) != expected:
        mismatched = ", ".join(sorted(set(weights) ^ expected)[:3])
        raise EdgeportError(f"{source.ref}: its weights do not map onto mlx-whisper's model ({mismatched})")
    model.update(tree_unflatten(list(weights.items())))
    del weights  # the model alone holds the (lazily loaded) weights, so that each is freed once quantized
    layout = {"model_type": "whisper", **asdict(dims)}
    if not quant.is_float:
        layout["quantization"] = {"group_size": quant.group_size, "bits": quant.bits}
        nn.quantize(
            model,
            group_size=quant.group_size,
            bits=quant.bits,
            class_predicate=lambda _, m: (
                isinstance(m, nn.Linear | nn.Embedding) and m.weight.shape[-1] % quant.group_size == 0
            ),
        )
    dest.mkdir()
    copy_app_files(source.path, dest)  # the tokenizer, feature extractor and generation settings
    mx.save_safetensors(str(dest / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(layout, indent=2))  # mlx-whisper's config, not transformers'
    engine = f"mlx {mx.__version__}, mlx-whisper {version('mlx-whisper')} layout"
    return Artifact("mlx", quant.name, dest, engine, MLXWhisper(), {"layout": "mlx-whisper"})


def mlx_weights(folder: Path, dtype) -> dict[str, mx.array]:
    """The transformers Whisper weights in `folder`, renamed for mlx-whisper, convolutions as MLX lays them out."""
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            if name in (MLXWhisper.OUTPUT_PROJECTION, MLXWhisper.ENCODER_POSITIONS):
                continue
            name = MLXWhisper.weight_name(name)
            if name.startswith("encoder.conv") and name.endswith("weight"):
                value = value.transpose(0, 2, 1)  # [out, in, kernel] -> MLX's [out, kernel, in]
            weights[name] = value.astype(dtype)
    return weights
