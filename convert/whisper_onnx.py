"""Whisper -> ONNX: `encoder.onnx` (log-mel features -> every decoder layer's cross-attention keys and values,
computed once per 30 s window) and `decoder.onnx` (tokens over a KV cache the app keeps -> logits and the new
keys and values), in the shape the target's compute unit runs.

- CPU shape (int8, fp16): the decoder takes any number of tokens over a past of any length.
- NPU shape (w8a16): static shapes, as an NPU compiles them: one token per call over a fixed cache of
  max_target_positions - 1 entries that an additive mask opens as it fills. Both graphs are QDQ-quantized for
  QNN, calibrated on the parity speech, exactly as the causal LM's NPU graphs are.

Both are built as the causal LM's NPU parts are, in units: the encoder in spans of layers (WhisperDims.encoder_spans:
the convolutions with the first, the final norm and the cross-attention projections last, alone), the decoder as
its embedding, its layers and its output projection. Each unit is read from the checkpoint on its own, exported,
quantized (calibrated on what the units before it handed on) and the units are joined into the graph. Memory holds
one unit in float32, not the whole model (3.2 GB for large-v3-turbo): torch's exporter holds about four copies of
what it exports.
`whisper.json` (the OnnxWhisper layout) records the shapes, names and the mask convention; the ONNX engine's
`WhisperONNXRunner` is the app's loop.
"""

import importlib
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, onnx_quantizer, quant_utils, quantize_dynamic

from edgeport import quantization
from edgeport.audio import parity_clips, windows
from edgeport.convert import Artifact, copy_app_files
from edgeport.convert.onnx import OPSET, RecordedFeeds, join_graphs, qdq_quantize, share_weights, weights_apart
from edgeport.convert.whisper_torch import DECODER_UNITS, CrossKV, DecoderStep
from edgeport.engines.onnx import WhisperONNXRunner
from edgeport.engines.reference import paged
from edgeport.engines.whisper import WhisperRunner
from edgeport.errors import EdgeportError
from edgeport.families.whisper import COMPONENTS
from edgeport.layouts import MASK_VALUE, OnnxWhisper, builds_qnn_shape
from edgeport.machine import release_freed_memory
from edgeport.plan import Step
from edgeport.quiet import converting
from edgeport.source import Source
from edgeport.targets import Target

DECODER_INPUTS = ["input_ids", "position_ids", "attention_mask", "past_key", "past_value", "cross_key", "cross_value"]
DECODER_OUTPUTS = ["logits", "new_key", "new_value"]
DECODER_BLOCKS = {  # what each of the decoder's units reads (its output projection is the token embedding)
    "embedding": ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    "layers": ("model.decoder.layers.",),
    "head": ("model.decoder.layer_norm", "model.decoder.embed_tokens"),
}
DYNAMIC_AXES = {  # the CPU shape's
    "input_ids": {1: "tokens"},
    "position_ids": {1: "tokens"},
    "hidden_states": {1: "tokens"},
    "attention_mask": {2: "tokens", 3: "attended"},
    "past_key": {3: "past"},
    "past_value": {3: "past"},
    "output_hidden_states": {1: "tokens"},
    "logits": {1: "tokens"},
    "new_key": {3: "tokens"},
    "new_value": {3: "tokens"},
}
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
        floats, quantized = Path(tmp) / "float", Path(tmp) / "quantized"
        floats.mkdir(), quantized.mkdir()
        graphs = export(source, floats, static=npu)
        copy_app_files(source.path, floats)
        if npu:
            feeds = _calibration_feeds(floats, graphs)
        for graph in COMPONENTS:
            for unit in graphs.units[graph]:
                if npu:
                    qdq_quantize(floats / unit, quantized / unit, feeds[unit], quant)
                    weights_apart(quantized / unit)
                else:
                    _cpu_precision(floats / unit, quantized / unit, quant)
                release_freed_memory()
            join_graphs([quantized / unit for unit in graphs.units[graph]], quantized / f"{graph}.onnx")
            share_weights(quantized, dest, [f"{graph}.onnx"], f"{graph}.onnx.data")
    copy_app_files(source.path, dest)
    layout = replace(graphs.layout, weights=quant.name)
    layout.write(dest)
    engine = f"torch.onnx {torch.__version__} + onnxruntime.quantization {onnxruntime.__version__}"
    return Artifact("onnx", quant.name, dest, engine, layout, {"shape": layout.shape, **asdict(layout)})


@dataclass(frozen=True)
class FloatGraphs:
    """What `export` writes: each graph's units in order (join_graphs makes them one), each with its weights in a
    file beside it, and the layout of the graphs they make."""

    units: dict[str, list[str]]  # "encoder", "decoder" -> the units' graph files
    layout: OnnxWhisper


def export(source: Source, folder: Path, static: bool) -> FloatGraphs:
    """Export the float encoder and decoder, a unit at a time, into `folder`."""
    dims = source.family.dims(source.config)
    read = _reader(source)
    units = {"encoder": [], "decoder": []}
    for first, end in dims.encoder_spans():
        model = read(lambda block, first=first, end=end: _in_span(block, first, end))
        units["encoder"].append(f"encoder-layers-{first}-{end}.onnx")
        given = (
            {"input_features": torch.zeros(1, dims.mels, 2 * dims.frames)}
            if first == 0
            else {"hidden_states": torch.zeros(1, dims.frames, dims.d_model)}
        )
        outputs = ["cross_key", "cross_value"] if first == end else ["output_hidden_states"]
        _export(CrossKV(model, first, end, cross=first == end), given, outputs, folder / units["encoder"][-1])
        del model
        release_freed_memory()
    past = dims.tokens - 1 if static else 3  # the example's length; dynamic in the CPU shape
    examples = {
        "input_ids": torch.zeros(1, 1, dtype=torch.int32),
        "position_ids": torch.zeros(1, 1, dtype=torch.int32),
        "hidden_states": torch.zeros(1, 1, dims.d_model),
        "attention_mask": torch.zeros(1, 1, 1, past + 1),
        "past_key": torch.zeros(dims.cache_shape(past)),
        "past_value": torch.zeros(dims.cache_shape(past)),
        "cross_key": torch.zeros(dims.cross_shape),
        "cross_value": torch.zeros(dims.cross_shape),
    }
    for unit, (inputs, outputs) in DECODER_UNITS.items():
        model = read(lambda block, unit=unit: block.startswith(DECODER_BLOCKS[unit]))
        units["decoder"].append(f"decoder-{unit}.onnx")
        axes = None if static else DYNAMIC_AXES
        _export(
            DecoderStep(model, unit), {n: examples[n] for n in inputs}, outputs, folder / units["decoder"][-1], axes
        )
        del model
        release_freed_memory()
    layout = OnnxWhisper(
        static=static,
        decoder_cache=dims.tokens - 1 if static else None,
        layers=dims.decoder_layers,
        heads=dims.decoder_heads,
        head_dim=dims.head_dim,
        frames=dims.frames,
        mask_value=MASK_VALUE,
        encoder={"inputs": ["input_features"], "outputs": ["cross_key", "cross_value"]},
        decoder={"inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS},
        cache="keys and values are [layers, 1, heads, length, head_dim]; a decoder call returns only the new "
        "tokens' entries, which the app appends (CPU shape) or writes after the filled ones (NPU shape, whose "
        "attention_mask is 0 where a position is filled and mask_value elsewhere)",
    )
    layout.write(folder)
    return FloatGraphs(units, layout)


def _export(module, given: dict, outputs: list[str], file: Path, axes: dict | None = None) -> None:
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(given.values()),
            str(file),
            input_names=list(given),
            output_names=outputs,
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=axes and {name: axes[name] for name in [*given, *outputs] if name in axes},
        )
    weights_apart(file)


def _reader(source: Source):
    """Read the source's model in float32 with only the blocks `wanted(name)` holds: a unit's, paged from the
    checkpoint; or the whole model, read once, where the checkpoint cannot be read a block at a time."""
    whole = None

    def read(wanted):
        nonlocal whole
        model = paged(source, lambda block: False, only=wanted)
        if model is None:
            whole = whole or source.load_reference()
            return whole
        return model

    return read


def _in_span(block: str, first: int, end: int) -> bool:
    """Whether the encoder's span [first, end) reads `block`: its layers, the convolutions and positions where it
    starts the encoder, and where it holds no layers (the last) the final norm and the decoder's layers, of which it
    runs the cross-attention projections."""
    if block.startswith("model.encoder.layers."):
        return first <= int(block.rsplit(".", 1)[1]) < end
    if first == end:
        return block == "model.encoder.layer_norm" or block.startswith("model.decoder.layers.")
    return first == 0 and block.startswith("model.encoder.") and block != "model.encoder.layer_norm"


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
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(exported), keep_io_types=True)
        onnx.save(half, dest, save_as_external_data=True, location=f"{dest.name}.data")


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


def _calibration_feeds(folder: Path, graphs: FloatGraphs) -> dict[str, list[Path]]:
    """What each float unit in `folder` sees while transcribing the first windows of the parity speech: the
    encoder's spans run one after another, each on what the one before handed on for every window, then the
    decoder's units together, as the decoder joined, on the last span's keys and values."""
    feeds = RecordedFeeds(folder / "calibration")
    audio = parity_clips()[0].audio
    mel = WhisperRunner(folder).mel
    handed = [{"input_features": mel(audio[start:end])} for start, end in windows(audio)[:CALIBRATION_WINDOWS]]
    for graph in graphs.units["encoder"]:
        span = _Units(folder, [graph], feeds)
        handed = [span.outputs(given) for given in handed]
        del span
        release_freed_memory()
    decoder = _Units(folder, graphs.units["decoder"], feeds)  # now, not beside an encoder span
    calls = 0

    def every_4th(graph: str, feed) -> None:
        nonlocal calls
        calls += 1
        decoder.recording = (calls - 1) % CALIBRATION_STRIDE == 0  # the window's first call, then every 4th

    runner = WhisperONNXRunner(folder, on_call=every_4th, sessions=(None, decoder))
    for encoded in handed:
        calls = 0
        runner.decode([encoded["cross_key"], encoded["cross_value"]])
    return feeds.files


class _Units:
    """Float units run one after another as the graph they join would run: each on the inputs it names, of those
    given and those the units before it returned (a unit's `output_hidden_states` is the next one's
    `hidden_states`). While `recording`, what each unit is given is recorded for its calibration."""

    def __init__(self, folder: Path, graphs: list[str], feeds: RecordedFeeds):
        self.sessions = [
            (graph, onnxruntime.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"]))
            for graph in graphs
        ]
        self.feeds, self.recording = feeds, True

    def outputs(self, given: dict) -> dict:
        known = dict(given)
        for graph, session in self.sessions:
            feed = {i.name: known[i.name] for i in session.get_inputs()}
            if self.recording:
                self.feeds.record(graph, lambda feed=feed: feed)
            names = [o.name for o in session.get_outputs()]
            known |= dict(zip(names, session.run(None, feed), strict=True))
            known["hidden_states"] = known.pop("output_hidden_states", None)
        return known

    def run(self, names: list[str] | None, given: dict) -> list:  # as an onnxruntime session runs the decoder
        known = self.outputs(given)
        return [known[name] for name in names or DECODER_OUTPUTS]

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]
