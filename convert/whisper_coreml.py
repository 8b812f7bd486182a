"""Whisper -> two Core ML ML Programs, as WhisperKit splits it: `encoder.mlpackage` (log-mel features -> every
decoder layer's cross-attention keys and values; the part the Neural Engine speeds up most) and
`decoder.mlpackage` (one token per call). From iOS 18 / macOS 15 the decoder keeps its self-attention KV cache as
Core ML state; before, the cache is passed in and the new entries come back. Static shapes throughout (a 30 s
window, a decoder cache of max_target_positions), which the Neural Engine requires; fp16 compute, weights
compressed by coremltools.optimize as the quantization asks.

Off macOS the packages cannot predict; they are checked by structure and by their weights read back.
"""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from coremltools.converters.mil.mil import types

from edgeport import quantization
from edgeport.convert import Artifact, copy_app_files
from edgeport.convert.coreml import ct, ct_convert, deployment_of, in_half
from edgeport.convert.whisper_torch import CrossKV, DecoderStep, StatefulDecoder
from edgeport.engines.coreml import describe
from edgeport.layouts import CoreMLWhisper
from edgeport.machine import blocks_over, page_out_checkpoints
from edgeport.plan import Step
from edgeport.quiet import converting
from edgeport.source import Source
from edgeport.targets import Target

UNITS = {"npu": "CPU_AND_NE", "gpu": "CPU_AND_GPU", "cpu": "CPU_ONLY"}


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write Whisper `source` as `dest/encoder.mlpackage` and `dest/decoder.mlpackage` (dest must not exist)."""
    quant = quantization.get(step.quantization, "coreml")
    deployment, stateful = deployment_of(target, quant)
    # Core ML computes in fp16 and its passes copy float32 matrices, so the matrices are read in fp16; the position
    # tables (consts the converter folds, which the parity reads back by name) and every other weight stay float32
    model = source.load_reference(dtype=torch.float16)
    model = in_half(model, keep=(model.model.encoder.embed_positions, model.model.decoder.embed_positions))
    dims = source.family.dims(source.config)
    length, cross, cache = dims.tokens, dims.cross_shape, dims.cache_shape(dims.tokens)
    dest.mkdir()
    with converting():
        encoder = _convert(
            CrossKV(model),
            [ct.TensorType("input_features", shape=(1, dims.mels, 2 * dims.frames))],
            [ct.TensorType("cross_key", dtype=np.float16), ct.TensorType("cross_value", dtype=np.float16)],
            None,
            deployment,
            quant,
        )
        encoder.save(str(dest / "encoder.mlpackage"))
        del encoder
        page_out_checkpoints()  # the encoder's weights, read from the source while it was traced and converted
        token = [
            ct.TensorType("input_ids", shape=(1, 1), dtype=np.int32),
            ct.TensorType("position", shape=(1,), dtype=np.int32),
            ct.TensorType("attention_mask", shape=(1, 1, 1, length), dtype=np.float16),
            ct.TensorType("cross_key", shape=cross, dtype=np.float16),
            ct.TensorType("cross_value", shape=cross, dtype=np.float16),
        ]
        if stateful:
            state = ct.TensorType(shape=cache, dtype=np.float16)
            decoder = _convert(
                StatefulDecoder(model, cache),
                token,
                [ct.TensorType("logits", dtype=np.float16)],
                [ct.StateType(state, name="keyCache"), ct.StateType(state, name="valueCache")],
                deployment,
                quant,
            )
        else:  # the cache goes in without the new token's slot; the new entries come back
            past = (*cache[:3], length - 1, cache[4])
            decoder = _convert(
                _PositionAsIds(DecoderStep(model)),
                [
                    *token[:3],
                    ct.TensorType("past_key", shape=past, dtype=np.float16),
                    ct.TensorType("past_value", shape=past, dtype=np.float16),
                    *token[3:],
                ],
                [ct.TensorType(name, dtype=np.float16) for name in ("logits", "new_key", "new_value")],
                None,
                deployment,
                quant,
            )
        decoder.save(str(dest / "decoder.mlpackage"))
    copy_app_files(source.path, dest)
    layout = CoreMLWhisper(
        compute_units=UNITS[step.unit],
        deployment_target=deployment,
        kv_cache="state" if stateful else "inputs and outputs",
        cache_shape=list(cache),
        cross_shape=list(cross),
        mask="additive fp16: 0 where the token may attend (filled positions and its own), -inf elsewhere",
    )
    layout.write(dest)
    details = {
        **asdict(layout),
        "encoder": describe(dest / "encoder.mlpackage"),
        "decoder": describe(dest / "decoder.mlpackage"),
    }
    return Artifact("coreml", quant.name, dest, f"coremltools {ct.__version__}", layout, details)


class _PositionAsIds(torch.nn.Module):
    """DecoderStep with the stateful decoder's inputs: `position` [1] instead of position_ids [1, 1]."""

    def __init__(self, step: DecoderStep):
        super().__init__()
        self.step = step

    def forward(self, input_ids, position, attention_mask, past_key, past_value, cross_key, cross_value):
        return self.step(input_ids, position[None], attention_mask, past_key, past_value, cross_key, cross_value)


def _convert(wrapper, inputs: list, outputs: list, states: list | None, deployment: str, quant):
    """Trace `wrapper` on zeros of the inputs' shapes and convert it."""
    example = tuple(
        torch.zeros(i.shape.shape, dtype=torch.int32 if types.is_int(i.dtype) else torch.float32) for i in inputs
    )
    with torch.no_grad(), blocks_over(2**20):  # the trace's activations handed back as they are freed
        traced = torch.jit.trace(wrapper.eval(), example, check_trace=False)
    return ct_convert(traced, inputs, outputs, states, deployment, quant)
