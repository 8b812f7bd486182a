"""Whisper -> the layout mlx-whisper loads: `config.json` with its ModelDimensions and `weights.safetensors` in its
own names (the layout's `weight_name`), float16 or affine-quantized.
"""

import json
import struct
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
    arrays = dict(tree_flatten(model.parameters()))
    del model  # the arrays alone hold what is still to be read and quantized
    dest.mkdir()
    copy_app_files(source.path, dest)  # the tokenizer, feature extractor and generation settings
    save_an_array_at_a_time(dest / "weights.safetensors", arrays)
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


SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.uint32: "U32",
    mx.uint64: "U64",
    mx.int8: "I8",
    mx.int16: "I16",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
}


def save_an_array_at_a_time(path: Path, arrays: dict[str, mx.array]) -> None:
    """The safetensors file mx.save_safetensors writes, each (lazy) array read, computed, written and freed in
    turn: MLX's own writer computes them all first, the whole model in memory (1.96 GB for Whisper large-v3-turbo's
    1.62 GB of weights). `arrays` is emptied."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data 8-byte aligned, as the format's writers pad it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in list(arrays):
            array = mx.contiguous(arrays.pop(name))
            mx.eval(array)
            file.write(memoryview(array))
