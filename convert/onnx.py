"""Causal LM -> ONNX, in the shape the target's compute unit runs (Whisper: `whisper_onnx`).

- CPU shape (fp32, int4 blocks): onnxruntime-genai's model builder writes a dynamic-shape graph with a KV cache,
  MatMulNBits weights and the genai_config.json its generator runs; its int4 pass goes a weight at a time
  (`onnx_builder`).
- NPU shape (w8a16, w4a16): an NPU compiles static graphs, so the model is exported from transformers as a
  prefill graph over QNN_PREFILL_CHUNK tokens and a decode graph over one, both reading a fixed-length KV cache
  that the app keeps (the graphs return only the new keys and values). As Qualcomm AI Hub's exports are, the model
  comes in parts of consecutive layers (the target's `qnn_part_gb`, and PART_PARAMS), each with its two graphs.
  A part is built in units (UNIT_PARAMS of layers, a larger layer alone; the embedding and the output projection
  alone, a slice of the vocabulary's rows at a time where larger): each is exported from its own blocks, run over a
  real summary request (prefill chunks, then decode steps) on the inputs the previous unit gave, and QDQ-quantized
  for QNN with onnxruntime's QNN helpers, calibrated on what it saw; then the next unit, and the part's units are
  joined into its two graphs (a table's slices first, to the same logits as the table whole). Memory holds one
  unit and one calibration call. `npu.json` (the OnnxNPU layout) records the parts, the shapes and the names.
"""

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import version
from importlib.util import find_spec
from itertools import groupby
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from onnxruntime.quantization import CalibrationDataReader, QuantType, qdq_quantizer, quant_utils, quantize_static
from onnxruntime.quantization.calibrate import MinMaxCalibrater, TensorsData, save_tensors_data
from onnxruntime.quantization.execution_providers import qnn
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
from transformers import DynamicCache

from edgeport import quantization
from edgeport.convert import Artifact, copy_app_files
from edgeport.engines.loop import hf_tokenizer
from edgeport.engines.onnx import PartRunner, part_calls, providers
from edgeport.engines.reference import part_forward, part_of, running_only, vocab_rows
from edgeport.errors import EdgeportError
from edgeport.families.causal_lm import UNIT_PARAMS, LayerSpan
from edgeport.layouts import MASK_VALUE, QNN_PREFILL_CHUNK, OnnxCPU, OnnxNPU, OnnxPart, builds_qnn_shape
from edgeport.machine import release_freed_memory
from edgeport.plan import Step
from edgeport.quiet import converting
from edgeport.source import Source
from edgeport.targets import Target
from edgeport.texts import default_article, summary_prompt

OPSET = 21
CALIBRATION_CHUNKS = 4  # prefill calls calibrated, each on the cache the previous ones filled
SHARED_MIN_BYTES = 1024  # initializers at least this large go to a part's shared weights file
PAGE_BYTES = 4096
CALIBRATION_DECODE_STEPS = 16
BUILDER_PRECISION = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int4-block32": "int4",
    "int4-block64": "int4",
    "int4-block128": "int4",
}


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as ONNX at `dest` (which must not exist): the NPU shape for a w*a16 quantization, else the
    CPU shape."""
    quant = quantization.get(step.quantization, "onnx")
    npu = builds_qnn_shape("onnx", quant)
    if quant.name not in BUILDER_PRECISION and not npu:
        raise EdgeportError(f"ONNX for a causal LM comes as fp32, fp16, int4 blocks, w8a16 or w4a16, not {quant.name}")
    if npu:
        layout, details = _npu_shape(source, quant, target, dest)
    else:
        layout, details = OnnxCPU(), _cpu_shape(source, quant, dest)
    details.update(onnxruntime=onnxruntime.__version__)
    return Artifact("onnx", quant.name, dest, _engine(quant), layout, details)


def _engine(quant) -> str:
    if builds_qnn_shape("onnx", quant):
        return f"torch.onnx {torch.__version__} + onnxruntime.quantization {onnxruntime.__version__} (QNN QDQ)"
    return f"onnxruntime-genai builder {version('onnxruntime-genai')}"


def _cpu_shape(source: Source, quant, dest: Path) -> dict:
    """onnxruntime-genai's model builder, run as its own process: it keeps its memory out of ours, and its
    command line is its documented interface."""
    if find_spec("onnxruntime_genai") is None:
        raise EdgeportError("the ONNX CPU shape needs onnxruntime-genai's builder: pip install 'edgeport[onnx]'")
    options = ["hf_token=false", f"hf_remote={'true' if source.trust_remote_code else 'false'}"]
    if quant.bits:
        options += [f"block_size={quant.group_size}", "accuracy_level=4"]  # int8 activations in the CPU kernels
    with tempfile.TemporaryDirectory(prefix="edgeport-ortgenai-") as cache:
        command = [
            sys.executable,
            "-m",
            "edgeport.convert.onnx_builder",
            "-i",
            str(source.path),
            "-o",
            str(dest),
            "-p",
            BUILDER_PRECISION[quant.name],
            "-e",
            "cpu",
            "-c",
            cache,
            "--extra_options",
            *options,
        ]
        returncode, log = _run_builder(command)
    if returncode != 0:
        last = next((line for line in reversed(log) if line.strip()), "no output")
        raise EdgeportError(f"{source.ref}: onnxruntime-genai's builder could not convert it ({last.strip()})")
    return {
        "shape": "cpu",
        "opset": _opset(dest / "model.onnx"),
        "builder_options": options,
        "builder_log_tail": log[-5:],
    }


def _run_builder(command: list[str]) -> tuple[int, list[str]]:
    """The builder's exit code and output lines. It runs in its own process group, ended with every process it
    started if edgeport is stopped (Ctrl-C, SIGTERM, SIGHUP) or fails while waiting for it."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as builder:
        try:
            log, _ = builder.communicate()
        except BaseException:
            os.killpg(builder.pid, signal.SIGKILL)
            builder.wait()
            raise
    return builder.returncode, log.strip().splitlines()


def _npu_shape(source: Source, quant, target: Target, dest: Path) -> tuple[OnnxNPU, dict]:
    layout = npu_layout(source, quant, target)
    calls, given = _calibration_calls(hf_tokenizer(source.path), layout)
    dest.mkdir()
    whole = None  # the source read whole, where its checkpoint cannot be read a block at a time
    with tempfile.TemporaryDirectory(prefix="edgeport-onnx-") as tmp, converting():  # the quantizer's advice
        floats, quantized = Path(tmp) / "float", Path(tmp) / "quantized"
        for part in layout.parts:
            quantized.mkdir()
            groups = [list(group) for _, group in groupby(export_units(source, part), key=_unit_key)]
            for group in groups:  # one unit, or the row slices of one table, each given the same inputs
                runs = []
                for span in group:  # all exported and calibrated first: the slices are quantized in one range
                    model = part_of(
                        source, span.start, span.stop, span.embedding, span.head, rows=span.rows,
                        attn_implementation="eager",
                    )  # fmt: skip
                    if model is None:
                        whole = whole or source.load_reference(attn_implementation="eager")
                        model = whole
                    with vocab_rows(model, span.rows):
                        runs.append(_calibrated(model, span, layout, floats, calls, given))
                    del model
                    release_freed_memory()
                overrides = _one_range(group, runs)
                for run in runs:
                    for graph, file in (("prefill", run.unit.prefill), ("decode", run.unit.decode)):
                        qdq_quantize(run.folder / file, quantized / file, run.feeds.files[graph], quant, overrides)
                        weights_apart(quantized / file)
                        release_freed_memory()
                    shutil.rmtree(run.folder)
                given = _handed_on(group[0], [run.outputs for run in runs])
            for width in (layout.prefill_chunk, 1):
                files = [_joined_slices(group, width, quantized) for group in groups]
                join_graphs(files, quantized / part.graph(width))
            share_weights(quantized, dest, [part.prefill, part.decode], part.weights)
            shutil.rmtree(quantized)
    copy_app_files(source.path, dest)
    blocks = f"in blocks of {quant.group_size}, output projection 8-bit" if quant.group_size else "per channel"
    layout = replace(
        layout,
        weights=f"{quant.bits}-bit {blocks}",
        activations=f"{quant.activation_bits}-bit",
        opset=_opset(dest / layout.parts[0].decode),
    )
    layout.write(dest)
    calibration = (
        f"{CALIBRATION_CHUNKS} prefill chunks and {CALIBRATION_DECODE_STEPS} decode steps of Python's reference "
        "docs, part by part"
    )
    return layout, {"shape": layout.shape, "calibration": calibration, **asdict(layout)}


def npu_layout(source: Source, quant, target: Target) -> OnnxNPU:
    """The NPU shape of `source` for `target`, in the family's parts for it."""
    context = target.context_length
    if context <= QNN_PREFILL_CHUNK:
        raise EdgeportError(
            f"a static KV cache needs a context longer than the {QNN_PREFILL_CHUNK}-token prefill chunk"
        )
    dims = source.family.dims(source.config)
    spans = source.family.npu_parts(source.config, target, quant)
    n = len(spans)
    return OnnxNPU(
        prefill_chunk=QNN_PREFILL_CHUNK,
        context_length=context,
        layers=dims.layers,
        kv_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab,
        mask_value=MASK_VALUE,
        inputs=[
            "input_ids (first part) or hidden_states",
            "position_ids",
            "attention_mask",
            "past_{key,value}_<layer>",
        ],
        outputs=["logits | output_hidden_states", "new_{key,value}_<layer>"],
        cache="the app keeps [1, kv_heads, context_length, head_dim] per layer; a call of width W reads its "
        "first context_length - W positions and returns W new ones to write after the n already filled",
        parts=[
            OnnxPart(
                f"prefill-{i + 1:02d}-of-{n:02d}.onnx",
                f"decode-{i + 1:02d}-of-{n:02d}.onnx",
                s.start,
                s.stop,
                f"weights-{i + 1:02d}-of-{n:02d}.data",
            )
            for i, s in enumerate(spans)
        ],
    )


def export_units(source: Source, part: OnnxPart) -> list[LayerSpan]:
    """`part` in the units it is exported, calibrated and quantized in, each of at most UNIT_PARAMS parameters (a
    larger layer alone; the embedding or the output projection in slices of rows), so that memory holds one unit's
    float graphs and not a whole part's; join_slices and join_graphs make them one."""
    return source.family.units(source.config, part.first_layer, part.end_layer, UNIT_PARAMS)


def unit_graphs(span: LayerSpan) -> OnnxPart:
    """The names of a unit's float and quantized graphs."""
    name = f"layers-{span.start}-{span.stop}"
    if span.start == span.stop:
        name = "embedding" if span.embedding else "head"
    if span.rows:
        name += "-rows-{}-{}".format(*span.rows)
    return OnnxPart(f"prefill-{name}.onnx", f"decode-{name}.onnx", span.start, span.stop)


@dataclass
class _Calibrated:
    """A unit exported as float graphs into `folder` and run over the calibration calls: the inputs each graph
    saw (`feeds`), what it handed on, and the range of its vocabulary's table where it holds only a slice of one."""

    unit: OnnxPart
    folder: Path
    feeds: "RecordedFeeds"
    outputs: list[np.ndarray]
    table_range: tuple[float, float] | None


def _calibrated(model, span: LayerSpan, layout: OnnxNPU, floats: Path, calls, given) -> _Calibrated:
    unit = unit_graphs(span)
    folder = floats / unit.prefill.removesuffix(".onnx")
    folder.mkdir(parents=True)
    table = model.get_input_embeddings().weight if span.rows and span.embedding else None
    table_range = (table.min().item(), table.max().item()) if table is not None else None
    export_part(model, unit, layout, folder, span.embedding, span.head)
    release_freed_memory()  # what the exporter copied goes before the next stage, as each stage's leftovers do
    feeds = RecordedFeeds(folder / "calibration")
    outputs = list(part_calls(PartRunner(folder, layout, unit, providers(False), feeds.record), calls, given))
    release_freed_memory()
    return _Calibrated(unit, folder, feeds, outputs, table_range)


def _one_range(group: list[LayerSpan], runs: list[_Calibrated]) -> dict:
    """The quantizer's overrides that give the row slices of one table the range of the whole: the embedding's
    rows that of the whole table (so each slice's rows quantize as the whole table's do), the head's logits that of
    all the logits calibrated."""
    if len(group) == 1:
        return {}
    if group[0].head:
        low = min(float(np.min(out)) for run in runs for out in run.outputs)
        high = max(float(np.max(out)) for run in runs for out in run.outputs)
        return {"logits": [{"rmin": np.float32(low), "rmax": np.float32(high)}]}
    low, high = min(run.table_range[0] for run in runs), max(run.table_range[1] for run in runs)
    graph = onnx.load(runs[0].folder / runs[0].unit.prefill, load_external_data=False).graph
    table = next(node.input[0] for node in graph.node if node.op_type == "Gather")
    return {table: [{"rmin": np.float32(low), "rmax": np.float32(high)}]}


def _unit_key(span: LayerSpan) -> tuple:
    """What the row slices of one table share, and no two other units do."""
    return span.start, span.stop, span.embedding, span.head


def _handed_on(span: LayerSpan, outputs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """What a unit, or the row slices of one table, hand to the next unit for each calibration call: the
    embedding's slices' rows summed (each is zero but for its own tokens), the head's logits in vocabulary order."""
    if len(outputs) == 1:
        return outputs[0]
    if span.head:
        return [np.concatenate(calls, axis=-1) for calls in zip(*outputs, strict=True)]
    return [np.sum(calls, axis=0) for calls in zip(*outputs, strict=True)]


def _joined_slices(group: list[LayerSpan], width: int, folder: Path) -> Path:
    """The quantized graph of `width` of a unit, or of the row slices of one table joined as one."""
    files = [folder / unit_graphs(span).graph(width) for span in group]
    if len(files) == 1:
        return files[0]
    dest = folder / unit_graphs(replace(group[0], rows=None)).graph(width)
    join_slices(files, dest, "Concat" if group[0].head else "Sum")
    return dest


def join_slices(files: list[Path], dest: Path, combine: str) -> None:
    """The graphs of one table's row slices as one graph written to `dest` beside them: all read the same inputs,
    and their outputs are combined by `combine` (the embedding's summed, the head's logits concatenated), then
    quantized in the range of all of them together: the whole table's (the embedding's rows keep their table's
    quantization), or the whole vocabulary's logits as calibrated. Every name inside a slice gets a prefix."""
    joined = onnx.load(files[0], load_external_data=False)
    graph, pieces = joined.graph, []
    output = _copy(graph.output[0])
    del graph.node[:], graph.initializer[:], graph.value_info[:], graph.output[:]
    for k, file in enumerate(files):
        piece = onnx.load(file, load_external_data=False).graph
        inner = {name for node in piece.node for name in node.output} | {t.name for t in piece.initializer}
        _rename(piece, {name: f"slice{k}/{name}" for name in inner - {v.name for v in piece.input}})
        for node in piece.node:
            node.name = f"slice{k}/{node.name}"
        graph.node.extend(piece.node)
        graph.initializer.extend(piece.initializer)
        graph.value_info.extend(piece.value_info)
        graph.input.extend(v for v in piece.input if v.name not in {i.name for i in graph.input})
        pieces.append(piece.output[0])
    name, attributes = output.name, {"axis": -1} if combine == "Concat" else {}
    scale, zero_point = _range_of_all(graph, [p.name for p in pieces])
    graph.initializer.extend([scale, zero_point])
    graph.node.extend(
        [
            onnx.helper.make_node(
                combine, [p.name for p in pieces], [f"{name}_joined"], f"{name}_{combine}", **attributes
            ),
            onnx.helper.make_node(
                "QuantizeLinear", [f"{name}_joined", scale.name, zero_point.name], [f"{name}_q"], f"{name}_q"
            ),
            onnx.helper.make_node("DequantizeLinear", [f"{name}_q", scale.name, zero_point.name], [name], f"{name}_dq"),
        ]
    )
    if combine == "Concat":  # the vocabulary's dimension is the slices' together
        last = output.type.tensor_type.shape.dim[-1]
        last.dim_value = sum(p.type.tensor_type.shape.dim[-1].dim_value for p in pieces)
    graph.value_info.extend(pieces)
    graph.output.append(output)
    onnx.save(joined, dest)


def _range_of_all(graph: onnx.GraphProto, names: list[str]) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    """The scale and zero point, of the same type, that represent every value the quantized outputs `names` can
    take (each the output of a DequantizeLinear), as onnxruntime's quantizer computes them for a range."""
    made_by = {node.output[0]: node for node in graph.node}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if not uses_external_data(t)}
    low, high = np.inf, -np.inf
    for name in names:  # the slices' outputs are all of one type
        scale, zero_point = (constants[i] for i in made_by[name].input[1:3])
        zero_type = onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype)
        qmin, qmax = quant_utils.get_qmin_qmax_for_qType(zero_type)
        ends = (np.array([qmin, qmax], np.float64) - zero_point) * scale
        low, high = min(low, ends.min()), max(high, ends.max())
    zero_point, scale = quant_utils.compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax)
    prefix = names[0].split("/", 1)[-1]
    return (
        onnx.numpy_helper.from_array(np.asarray(scale, np.float32), f"{prefix}_joined_scale"),
        onnx.helper.make_tensor(f"{prefix}_joined_zero_point", zero_type, [], [int(zero_point)]),
    )


def join_graphs(files: list[Path], dest: Path) -> None:
    """The graphs of consecutive layer spans as one, written to `dest` beside them: each span's
    `output_hidden_states` feeds the next one's `hidden_states`, all read the same position ids and mask and each
    its own layers' cache. The joined graph names the weights where the spans' graphs keep them; every name inside a
    later span gets a prefix."""
    joined = onnx.load(files[0], load_external_data=False)
    graph = joined.graph
    for k, file in enumerate(files[1:], 1):
        span = onnx.load(file, load_external_data=False).graph
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in span.node for a in n.attribute
        ):
            raise EdgeportError(f"{file.name}: a graph with subgraphs cannot be joined")
        link = f"span{k}/hidden_states"
        handed = next(v for v in graph.output if v.name == "output_hidden_states")
        graph.value_info.append(onnx.helper.make_value_info(link, handed.type))
        _rename(graph, {"output_hidden_states": link})
        outer = {v.name for v in (*span.input, *span.output)}
        inner = {name for node in span.node for name in node.output} | {t.name for t in span.initializer}
        _rename(span, {name: f"span{k}/{name}" for name in inner - outer} | {"hidden_states": link})
        _read_as_handed(graph, span, link)
        for node in span.node:
            node.name = f"span{k}/{node.name}"
        shared = {v.name for v in graph.input}
        graph.node.extend(span.node)
        graph.initializer.extend(span.initializer)
        graph.value_info.extend(span.value_info)
        graph.input.extend(v for v in span.input if v.name != link and v.name not in shared)
        # outputs: the last span's hidden states or logits, then every layer's new keys and values in order
        outputs = [span.output[0], *(v for v in graph.output if v.name != link), *span.output[1:]]
        outputs = [_copy(v) for v in outputs]
        del graph.output[:]
        graph.output.extend(outputs)
    onnx.save(joined, dest)


def _read_as_handed(graph: onnx.GraphProto, span: onnx.GraphProto, link: str) -> None:
    """`span` reading `link` as `graph` hands it over, quantized and dequantized, where it would quantize it once
    more: the joined graph then quantizes each hidden state once, as the part exported whole does. Quantized twice,
    an embedding's output no longer ends in its table's own quantization, and onnxruntime's CPU EP dequantizes the
    whole table at every call instead of gathering from it (2.2 GB more for Llama-3.2-1B's)."""
    if next((n.op_type for n in graph.node if link in n.output), None) != "DequantizeLinear":
        return
    again = [n for n in span.node if n.op_type == "QuantizeLinear" and n.input[0] == link]  # one a slice of a table
    back = [n for n in span.node if any(q.output[0] in n.input for q in again)]
    if not again or not back or any(n.op_type != "DequantizeLinear" for n in back):
        return
    dropped = {id(n) for n in (*again, *back)}
    gone = {*(q.output[0] for q in again), *(n.output[0] for n in back)}
    kept = [n for n in span.node if id(n) not in dropped]
    del span.node[:]
    span.node.extend(kept)
    kept_info = [v for v in span.value_info if v.name not in gone]
    del span.value_info[:]
    span.value_info.extend(kept_info)
    _rename(span, {n.output[0]: link for n in back})
    used = {name for node in span.node for name in node.input}
    kept_weights = [t for t in span.initializer if t.name in used]  # the dropped pairs' scales and zero points go
    del span.initializer[:]
    span.initializer.extend(kept_weights)


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    for named in (*graph.initializer, *graph.input, *graph.output, *graph.value_info):
        named.name = names.get(named.name, named.name)


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copied = onnx.ValueInfoProto()
    copied.CopyFrom(value)
    return copied


def export_part(
    model, part: OnnxPart, layout: OnnxNPU, folder: Path, embedding: bool | None = None, head: bool | None = None
) -> None:
    """Export `part`'s float prefill and decode graphs of `model` (a transformers causal LM holding at least the
    part's weights) into `folder`: after the embedding where the part starts the decoder (or `embedding`), ending
    with the final norm and the output projection where it ends it (or `head`)."""
    _fuse_rms_norms(model)
    first = part.first_layer == 0 if embedding is None else embedding
    last = part.end_layer == layout.layers if head is None else head
    past = [f"past_{kind}_{i}" for i in part.layers for kind in ("key", "value")]
    new = [f"new_{kind}_{i}" for i in part.layers for kind in ("key", "value")]
    step = StaticStep(model, part.first_layer, last)
    hidden = model.config.get_text_config().hidden_size
    for width in (layout.prefill_chunk, 1):
        inputs = torch.zeros(1, width, dtype=torch.int32) if first else torch.zeros(1, width, hidden)
        example = (
            inputs,
            torch.zeros(1, width, dtype=torch.int32),
            torch.zeros(1, 1, width, layout.context_length),
            *[torch.zeros(1, layout.kv_heads, layout.context_length - width, layout.head_dim) for _ in past],
        )
        file = folder / part.graph(width)
        with torch.no_grad(), running_only(model, part.first_layer, part.end_layer, last), converting():
            torch.onnx.export(  # converting(): tracer warnings about transformers' cache internals
                step,
                example,
                str(file),
                input_names=["input_ids" if first else "hidden_states", "position_ids", "attention_mask", *past],
                output_names=["logits" if last else "output_hidden_states", *new],
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter keeps the static shapes as given
            )
        weights_apart(file)
        _annotate_shapes(file)


def qdq_quantize(exported: Path, dest: Path, feeds: list[Path], quant, overrides: dict | None = None) -> None:
    """A float graph QDQ-quantized as QNN runs it: `quant.bits` weights per channel (or in blocks of
    `quant.group_size`), 16-bit activations with ranges calibrated on `feeds`, and the quantizer's tensor
    `overrides`."""
    large = weights_apart(exported) >= onnx.checker.MAXIMUM_PROTOBUF
    prepared = exported.with_suffix(".prepared.onnx")
    if not qnn.qnn_preprocess_model(exported, prepared, save_as_external_data=True):  # writes only changes
        prepared = exported
    config = qnn.get_qnn_qdq_config(
        prepared,
        None,  # calibrated below
        activation_type=QuantType.QUInt16,
        weight_type=QuantType.QUInt8 if quant.bits == 8 else QuantType.QInt4,
        per_channel=True,
        init_overrides=_sensitive_layers(prepared, quant) | (overrides or {}),
    )
    config.use_external_data_format = large  # the quantized graph keeps its weights in it where it can
    if quant.group_size:  # opset-21 block-wise weights: what QNN's low-power block quantization runs
        config.extra_options["BlockSize"] = quant.group_size
    with tempfile.TemporaryDirectory(prefix="edgeport-calibration-") as tmp, _whole_array_quantization():
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(_ranges(prepared, config, Path(tmp) / "augmented.onnx", feeds), ranges)
        quantize_static(
            prepared,
            dest,
            calibration_cache_path=ranges,
            **{option: getattr(config, option) for option in STATIC_QUANT_OPTIONS},
        )


# What quantize() passes on from a StaticQuantConfig to quantize_static (which alone takes precomputed ranges).
STATIC_QUANT_OPTIONS = (
    "calibrate_method",
    "quant_format",
    "activation_type",
    "weight_type",
    "op_types_to_quantize",
    "nodes_to_quantize",
    "nodes_to_exclude",
    "per_channel",
    "reduce_range",
    "use_external_data_format",
    "extra_options",
)


class _Calibrater(MinMaxCalibrater):
    """onnxruntime's min-max calibrator, its session run in priority-based order. In the default order the session
    computes the whole graph before any of the ReduceMin/ReduceMax nodes the calibrator adds, so every intermediate
    tensor of a call is alive at once (0.9 GB a layer of Whisper large-v3-turbo's encoder, 1.2 GB a layer of
    Llama-3.2-1B's prefill over a 4096-token cache); in priority order each is reduced and freed as it is made."""

    def create_inference_session(self):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
        self.infer_session = onnxruntime.InferenceSession(
            self.augmented_model_path, options, providers=self.execution_providers
        )


def _ranges(model: Path, config, augmented: Path, feeds: list[Path]) -> TensorsData:
    """Every activation's range over `feeds`, which are read one at a time, as quantize_static would calibrate."""
    calibrater = _Calibrater(model, config.op_types_to_quantize, augmented, use_external_data_format=True)
    calibrater.augment_graph()
    calibrater.create_inference_session()
    calibrater.collect_data(_Reader(feeds))
    return calibrater.compute_data()


@contextmanager
def _whole_array_quantization():
    """onnxruntime's QDQ quantizer with each weight quantized on whole arrays. onnxruntime 1.32 quantizes a block-wise
    weight one 32-value block per Python call, and packs 4-bit values two a byte in a Python loop (together 30 us a
    block: 40 minutes for the two graphs of a 1B model, 5 hours for an 8B; w4a16's 8-bit output projection alone is 885k
    blocks a graph for the fixture, half a minute), and a per-channel weight one channel per call. The same arithmetic
    on whole arrays, to the same bytes, a few rows at a time (on a whole 16-bit embedding table onnxruntime holds four
    float32 copies of it: 8 GB for Llama-3.1-8B's); float types and scalars are left to onnxruntime."""
    original = qdq_quantizer.quantize_onnx_initializer
    qdq_quantizer.quantize_onnx_initializer = partial(_quantize_initializer, original)
    try:
        yield
    finally:
        qdq_quantizer.quantize_onnx_initializer = original


QUANTIZE_CHUNK_VALUES = 1 << 24
FOUR_BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
INTEGER = (*FOUR_BIT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)


def _quantize_initializer(
    original, weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None, block_size=0
) -> onnx.TensorProto:
    if quant_type not in INTEGER or not weight.dims:  # a float type, or a scalar
        return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
    data = quant_utils.tensor_proto_to_array(weight)
    stored = np.empty(data.shape, onnx.helper.tensor_dtype_to_np_dtype(quant_type))
    low, high = quant_utils.get_qmin_qmax_for_qType(quant_type)
    # a few rows at a time, so that the arithmetic's float32 temporaries stay small beside an 8B model's 2 GB table
    rows = max(1, QUANTIZE_CHUNK_VALUES // max(1, data[0].size))
    rows = -(-rows // block_size) * block_size if block_size and axis == 0 else rows  # whole blocks of rows
    for start in range(0, data.shape[0], rows):
        chunk = slice(start, min(start + rows, data.shape[0]))
        chunk_scale, chunk_zero = (_along(p, axis, block_size, chunk, data.shape) for p in (scale, zero_point))
        quantized = (data[chunk].astype(np.float32) / chunk_scale).round() + chunk_zero.astype(np.float32)
        stored[chunk] = np.clip(quantized, low, high, out=quantized)
    name = quant_weight_name or f"{weight.name}{quant_utils.TENSOR_NAME_QUANT_SUFFIX}"
    if quant_type not in FOUR_BIT:
        return onnx.numpy_helper.from_array(stored.reshape(weight.dims), name)
    nibbles = stored.reshape(-1).view(np.uint8) & 0xF  # one value a byte, as onnxruntime packs them
    nibbles = np.append(nibbles, np.uint8(0)) if nibbles.size % 2 else nibbles
    packed = (nibbles[0::2] | nibbles[1::2] << 4).tobytes()  # two a byte, the first in the low half
    return onnx.helper.make_tensor(name, quant_type, weight.dims, packed, raw=True)


def _along(params: np.ndarray, axis: int | None, block_size: int, rows: slice, shape: tuple) -> np.ndarray:
    """A weight's scales or zero points (one for the whole tensor where `axis` is None, else per channel along
    `axis`, or per block of `block_size` along it) for its `rows`, shaped to broadcast against them."""
    if block_size > 0:
        if axis == 0:
            return np.take(params, np.arange(rows.start, rows.stop) // block_size, 0)
        return np.take(params[rows], np.arange(shape[axis]) // block_size, axis)
    params = params.reshape([-1 if dim == axis else 1 for dim in range(len(shape))])
    return params[rows] if axis == 0 else params


def _annotate_shapes(model_file: Path) -> None:
    """Record every tensor's type and shape in the graph: the calibrator picks the tensors it measures from them,
    and ONNX's own inference stops at SimplifiedLayerNormalization, which onnxruntime's inference knows."""
    model = onnx.load(model_file, load_external_data=False)
    onnx.save(SymbolicShapeInference.infer_shapes(model, auto_merge=True), model_file)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def symbolic(g, x, weight, eps):
        out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        return out.setType(x.type())  # ONNX's shape inference does not know the op; the quantizer needs the type


class FusedRMSNorm(torch.nn.Module):
    """transformers' RMSNorm exported as one SimplifiedLayerNormalization node, which onnxruntime's CPU and QNN EPs
    run. Left as Pow/ReduceMean/Sqrt, its squared activations span a range no 16-bit scale holds."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.variance_epsilon)

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def _fuse_rms_norms(model: torch.nn.Module) -> None:
    """Swap every Llama-style RMSNorm (weight x normalized input) for FusedRMSNorm, in place."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FusedRMSNorm(module))


class StaticStep(torch.nn.Module):
    """transformers' model over a given past: the cache of the part's layers (from `first_layer`) is filled from
    the inputs, the new entries returned. The first part takes token ids, the others hidden states; the last one
    returns logits, the others its hidden states."""

    def __init__(self, model, first_layer: int = 0, last: bool = True):
        super().__init__()
        self.model, self.first_layer, self.last = model, first_layer, last

    def forward(self, inputs, position_ids, attention_mask, *past):
        cache = DynamicCache(config=self.model.config)
        layers = range(self.first_layer, self.first_layer + len(past) // 2)
        for i, layer in enumerate(layers):
            cache.update(past[2 * i], past[2 * i + 1], layer)
        out = part_forward(
            self.model,
            inputs if inputs.is_floating_point() else inputs.long(),
            self.last,
            cache,
            position_ids=position_ids.long(),
            attention_mask=attention_mask,
            use_cache=True,
        )
        width = inputs.shape[1]
        new = [t[:, :, -width:] for layer in layers for t in (cache.layers[layer].keys, cache.layers[layer].values)]
        return (out, *new)


def _calibration_calls(tokenizer, layout: OnnxNPU) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
    """What the first part sees while a real summary request is prefilled and answered: prefill chunks of the
    prompt, then decode steps on the article's first tokens (teacher-forced: the parts run one after another, so no
    part can wait for the logits). The chat template matters: its first tokens carry the largest activations
    (attention sinks), and a range calibrated without them would clip them. Returns each call's (real tokens,
    graph width) and its input."""
    width = layout.prefill_chunk
    chunks = min(CALIBRATION_CHUNKS, (layout.context_length - CALIBRATION_DECODE_STEPS) // width)
    prompt = summary_prompt(tokenizer, default_article(), chunks * width)
    answer = tokenizer.encode(default_article(), add_special_tokens=False)[:CALIBRATION_DECODE_STEPS]
    pieces = [prompt[i : i + width] for i in range(0, len(prompt), width)]
    calls = [(len(piece), width) for piece in pieces] + [(1, 1)] * len(answer)
    given = [np.array([piece + [0] * (width - len(piece))], np.int32) for piece in pieces]
    return calls, given + [np.array([[token]], np.int32) for token in answer]


class RecordedFeeds:
    """A graph's inputs written to files as each call happens, for the calibrator to read back one at a time:
    memory holds one call's inputs (each a whole static KV cache), not every call's."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, list[Path]] = {}
        folder.mkdir(exist_ok=True)

    def record(self, graph: str, copy) -> None:
        files = self.files.setdefault(graph, [])
        files.append(self.folder / f"{graph}-{len(files)}.npz")
        np.savez(files[-1], **copy())


class _Reader(CalibrationDataReader):
    """Recorded feeds as onnxruntime's calibration reader, each read when asked for."""

    def __init__(self, feeds: list[Path]):
        self.pending = iter(feeds)

    def get_next(self) -> dict | None:
        file = next(self.pending, None)
        return None if file is None else dict(np.load(file))


def _sensitive_layers(model_file: Path, quant) -> dict:
    """At 4 bits the output projection keeps 8-bit weights: it is the layer that hurts most when squeezed."""
    if quant.bits >= 8:
        return {}
    graph = onnx.load(model_file, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    head = next((n for n in graph.node if "logits" in n.output and n.op_type in ("MatMul", "Gemm")), None)
    weights = [name for name in (head.input if head else []) if name in initializers]
    return {name: [{"quant_type": QuantType.QUInt8}] for name in weights}


def share_weights(source: Path, dest: Path, graphs: list[str], data_name: str) -> None:
    """Write `graphs` (a part's prefill and decode graphs, or a Whisper graph) from `source` to `dest` with their
    weights in one external data file there, `data_name`, each tensor once, read a tensor at a time from the files
    the graphs name (a part's are over 2 GB). A part's prefill and decode graphs quantize the same weights to the
    same bytes (a weight's scales come from the weight alone), so the part downloads and sits on disk once. Offsets
    are page-aligned, so onnxruntime can map the file."""
    stored: dict[tuple[str, bytes], tuple[int, int]] = {}
    with open(dest / data_name, "wb") as data:
        for name in graphs:
            model = onnx.load(source / name, load_external_data=False)
            for tensor in model.graph.initializer:
                raw = _raw_bytes(tensor, source)
                if len(raw) < SHARED_MIN_BYTES:  # scales and zero points stay in the graph
                    if uses_external_data(tensor):
                        tensor.raw_data, tensor.data_location = raw, onnx.TensorProto.DEFAULT
                        del tensor.external_data[:]
                    continue
                key = (tensor.name, hashlib.sha256(raw).digest())
                if key not in stored:
                    offset = -(-data.tell() // PAGE_BYTES) * PAGE_BYTES
                    data.seek(offset)
                    data.write(raw)
                    stored[key] = (offset, len(raw))
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                del tensor.external_data[:]  # onnx's set_external_data wants the bytes in the message
                for field, value in (("location", data_name), ("offset", offset), ("length", length)):
                    tensor.external_data.add(key=field, value=str(value))
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, dest / name)


def _raw_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes:
    """A tensor's raw bytes, read from the file beside its graph where it keeps them there: never into the graph's
    message, whose memory protobuf keeps until the whole message goes."""
    if not uses_external_data(tensor):
        return tensor.raw_data
    where = ExternalDataInfo(tensor)
    with open(folder / where.location, "rb") as file:
        file.seek(where.offset or 0)
        return file.read(where.length if where.length is not None else -1)


def weights_apart(model_file: Path) -> int:
    """Keep a graph's weights in `<name>.data` beside it, unless torch already wrote them apart, and return their
    size. The passes that need only the graph then load only the graph: ONNX shape inference copies a model whole
    (5.3 GB to annotate the fixture's 0.65 GB graph with its weights in it), and onnxruntime's QNN configuration
    runs it too."""
    model = onnx.load(model_file, load_external_data=False)
    if not any(uses_external_data(tensor) for tensor in model.graph.initializer):
        onnx.save(model, model_file, save_as_external_data=True, location=f"{model_file.name}.data")
    return sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer
    )


def _opset(model_file: Path) -> int:
    model = onnx.load(model_file, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
