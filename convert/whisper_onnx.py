"""Whisper -> ONNX: `encoder.onnx` (log-mel features -> every decoder layer's cross-attention keys and values,
computed once per 30 s window) and `decoder.onnx` (tokens over a KV cache the app keeps -> logits and the new
keys and values), in the shape the target's compute unit runs.

- CPU shape (int8, fp16): the decoder takes any number of tokens over a past of any length.
- NPU shape (w8a16): static shapes, as an NPU compiles them: one token per call over a fixed cache of
  max_target_positions - 1 entries that an additive mask opens as it fills. Both graphs are QDQ-quantized for
  QNN, calibrated on the parity speech, exactly as the causal LM's NPU graphs are.
`whisper.json` (the OnnxWhisper layout) records the shapes, names and the mask convention; the ONNX engine's
`WhisperONNXRunner` is the app's loop.
"""

import importlib
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, onnx_quantizer, quant_utils, quantize_dynamic

from edgeport import quantization
from edgeport.audio import parity_clips, windows
from edgeport.convert import Artifact, copy_app_files
from edgeport.convert.onnx import OPSET, RecordedFeeds, qdq_quantize, weights_apart
from edgeport.convert.whisper_torch import CrossKV, DecoderStep
from edgeport.engines.onnx import WhisperONNXRunner
from edgeport.engines.reference import whole
from edgeport.errors import EdgeportError
from edgeport.families.whisper import COMPONENTS
from edgeport.layouts import MASK_VALUE, OnnxWhisper, builds_qnn_shape
from edgeport.plan import Step
from edgeport.quiet import converting
from edgeport.source import Source
from edgeport.targets import Target

DECODER_INPUTS = ["input_ids", "position_ids", "attention_mask", "past_key", "past_value", "cross_key", "cross_value"]
DECODER_OUTPUTS = ["logits", "new_key", "new_value"]
CALIBRATION_WINDOWS = 2  # windows of parity speech the NPU graphs are calibrated on, every decoding step covered
CALIBRATION_STRIDE = 4  # every 4th decoder call is calibrated: all positions are covered, a quarter of the copies


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write Whisper `source` as ONNX at `dest` (which must not exist)."""
    quant = quantization.get(step.quantization, "onnx")
    npu = builds_qnn_shape("onnx", quant)
    if npu and quant.group_size:
        raise EdgeportError(
            f"ONNX Whisper at {quant.name}: onnxruntime's QDQ quantizer puts every weight in blocks, which Whisper's "
            "convolutions and LayerNorm scales cannot take, and 4 bits per channel breaks it; use --quant w8a16"
        )
    if not npu and not (quant.is_float or quant.bits == 8):
        raise EdgeportError(f"ONNX Whisper for a CPU comes as fp16 or int8, not {quant.name}")
    dest.mkdir()
    with tempfile.TemporaryDirectory(prefix="edgeport-onnx-whisper-") as tmp, converting():
        float_dir = Path(tmp)
        layout = export(source, float_dir, static=npu)
        layout.write(float_dir)
        copy_app_files(source.path, float_dir)
        if npu:
            feeds = _calibration_feeds(float_dir)
            for graph in COMPONENTS:
                qdq_quantize(float_dir / f"{graph}.onnx", dest / f"{graph}.onnx", feeds[graph], quant)
        else:
            for graph in COMPONENTS:
                _cpu_precision(float_dir / f"{graph}.onnx", dest / f"{graph}.onnx", quant)
    copy_app_files(source.path, dest)
    layout = replace(layout, weights=quant.name)
    layout.write(dest)
    engine = f"torch.onnx {torch.__version__} + onnxruntime.quantization {onnxruntime.__version__}"
    return Artifact("onnx", quant.name, dest, engine, layout, {"shape": layout.shape, **asdict(layout)})


def export(source: Source, folder: Path, static: bool) -> OnnxWhisper:
    """Export the float encoder and decoder graphs into `folder`; return their layout."""
    model = whole(source)
    dims = source.family.dims(source.config)
    frames = dims.frames
    past = dims.tokens - 1 if static else 3  # the example's length; dynamic in the CPU shape
    tokens = 1
    with torch.no_grad():
        torch.onnx.export(
            CrossKV(model),
            (torch.zeros(1, dims.mels, 2 * frames),),
            str(folder / "encoder.onnx"),
            input_names=["input_features"],
            output_names=["cross_key", "cross_value"],
            opset_version=OPSET,
            dynamo=False,
        )
        for weight in model.model.encoder.parameters():  # exported: the decoder's export would carry a copy along
            weight.data = torch.empty(0)  # (left on the CPU: transformers 5.25 takes the model's device from them)
        torch.onnx.export(
            DecoderStep(model),
            (
                torch.zeros(1, tokens, dtype=torch.int32),
                torch.zeros(1, tokens, dtype=torch.int32),
                torch.zeros(1, 1, tokens, past + tokens),
                torch.zeros(dims.cache_shape(past)),
                torch.zeros(dims.cache_shape(past)),
                torch.zeros(dims.cross_shape),
                torch.zeros(dims.cross_shape),
            ),
            str(folder / "decoder.onnx"),
            input_names=DECODER_INPUTS,
            output_names=DECODER_OUTPUTS,
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=None
            if static
            else {
                "input_ids": {1: "tokens"},
                "position_ids": {1: "tokens"},
                "attention_mask": {2: "tokens", 3: "attended"},
                "past_key": {3: "past"},
                "past_value": {3: "past"},
                "logits": {1: "tokens"},
                "new_key": {3: "tokens"},
                "new_value": {3: "tokens"},
            },
        )
    return OnnxWhisper(
        static=static,
        decoder_cache=dims.tokens - 1 if static else None,
        layers=dims.decoder_layers,
        heads=dims.decoder_heads,
        head_dim=dims.head_dim,
        frames=frames,
        mask_value=MASK_VALUE,
        encoder={"inputs": ["input_features"], "outputs": ["cross_key", "cross_value"]},
        decoder={"inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS},
        cache="keys and values are [layers, 1, heads, length, head_dim]; a decoder call returns only the new "
        "tokens' entries, which the app appends (CPU shape) or writes after the filled ones (NPU shape, whose "
        "attention_mask is 0 where a position is filled and mask_value elsewhere)",
    )


def _cpu_precision(exported: Path, dest: Path, quant) -> None:
    """int8: onnxruntime's dynamic quantization, 8-bit weights per channel and activations quantized at run
    time, the weights in a file beside the graph (serialized into it, the proto's encoding held 2.7 GB more for
    Whisper large-v3-turbo's 0.68 GB encoder); fp16: every float tensor in half precision, inputs and outputs kept
    float32."""
    if quant.bits == 8:
        weights_apart(exported)
        with _weights_read_once(exported.parent):
            quantize_dynamic(
                exported,
                dest,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gather"],
                use_external_data_format=True,
            )
        weights = dest.with_name(f"{dest.name}.data")
        weights.chmod(stat.S_IMODE(dest.stat().st_mode))  # onnx writes it for its owner alone
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(exported), keep_io_types=True), dest)


@contextmanager
def _weights_read_once(folder: Path):
    """onnxruntime's dynamic quantizer with the float weights in memory once instead of three times. It loads the
    model, then (to infer shapes again after its first pass) saves a deep copy and reads that back: the model, the
    copy and the model read back, alive together (9.3 GB for Whisper large-v3-turbo's 3.1 GB float encoder). Here
    the graphs in `folder` keep their weights in files beside them: the model is loaded without them, and they are
    read once, when the model is read back."""

    def load_graph(model_path: Path) -> onnx.ModelProto:
        inferred = model_path.with_name(f"{model_path.stem}.inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        model = onnx.load(inferred, load_external_data=False)
        inferred.unlink()
        quant_utils.add_infer_metadata(model)
        return model

    def save_and_reload(model: onnx.ModelProto) -> onnx.ModelProto:
        graph = folder / "quantizing.onnx"
        onnx.save_model(model, graph)  # the graph alone, beside the weights it names
        try:
            return quant_utils.load_model_with_shape_infer(graph)
        finally:
            graph.unlink()

    quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not its function
    patches = [
        (quantize, "load_model_with_shape_infer", load_graph),
        (onnx_quantizer, "save_and_reload_model_with_shape_infer", save_and_reload),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _calibration_feeds(float_dir: Path) -> dict[str, list[Path]]:
    """What each float graph sees while transcribing the first windows of the parity speech."""
    feeds = RecordedFeeds(float_dir / "calibration")
    calls = 0

    def record(graph: str, feed) -> None:
        nonlocal calls
        if graph == "decoder":
            calls += 1
            if (calls - 1) % CALIBRATION_STRIDE:  # the window's first call, then every 4th
                return
        feeds.record(graph, feed)

    audio = parity_clips()[0].audio
    runner = WhisperONNXRunner(float_dir, on_call=record)
    for start, end in windows(audio)[:CALIBRATION_WINDOWS]:
        calls = 0
        runner.decode(runner.encode(runner.mel(audio[start:end])))
    return feeds.files
