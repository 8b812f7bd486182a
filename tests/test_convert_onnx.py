"""ONNX conversion for real on tiny models: the CPU shape through onnxruntime-genai's builder, the static NPU shape
exported from transformers and QDQ-quantized for QNN, both run on onnxruntime's CPU EP."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from conftest import convert, make_model, run_cli
from transformers import AutoModelForCausalLM

from edgeport import manifest, quantization, targets
from edgeport.convert import copy_app_files
from edgeport.convert import onnx as onnx_convert
from edgeport.engines.onnx import QNN_ABSENT, ONNXRunner, StaticKVRunner
from edgeport.source import open_source


@pytest.fixture(scope="module")
def cpu_output(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "cpu"
    return out, convert(tiny_llama, out, "host", "--formats", "onnx")


@pytest.fixture(scope="module", params=["w8a16", "w4a16"])
def npu_output(request, tiny_llama, tmp_path_factory):
    target = {"w8a16": "snapdragon-8-gen-3", "w4a16": "snapdragon-8-elite"}[request.param]
    out = tmp_path_factory.mktemp("onnx") / request.param
    return out, convert(tiny_llama, out, target, "--formats", "onnx")


@pytest.fixture(scope="module")
def float_static(tiny_llama, tmp_path_factory):
    """The float prefill and decode graphs before quantization, at a short context, in two parts (a part bound so
    small that each layer is one)."""
    folder = tmp_path_factory.mktemp("static")
    source = open_source(str(tiny_llama))
    target = replace(targets.load("snapdragon-8-elite"), context_length=256, qnn_part_gb=1e-7)
    layout = onnx_convert.npu_layout(source, quantization.get("w4a16", "onnx"), target)
    assert [(p.first_layer, p.end_layer) for p in layout.parts] == [(0, 1), (1, 2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    for part in layout.parts:
        onnx_convert.export_part(model, part, layout, folder)
    layout.write(folder)
    copy_app_files(tiny_llama, folder)
    return folder


def reference_logits(model_folder, ids):
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_cpu_shape_is_the_genai_builders_model_and_matches_the_source(cpu_output):
    out, result = cpu_output
    (artifact,) = result["artifacts"]
    assert (artifact["format"], artifact["quantization"], artifact["details"]["shape"]) == (
        "onnx",
        "int4-block32",
        "cpu",
    )
    assert artifact["engine"].startswith("onnxruntime-genai builder")
    assert artifact["parity"]["status"] == "passed" and artifact["parity"]["not_checked"] == []
    graph = onnx.load(out / "onnx" / "model.onnx", load_external_data=False).graph
    # per layer: fused qkv, o, gate, up, down; and the output projection
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 5 + 1
    nbits = next(n for n in graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in nbits.attribute}["block_size"] == 32
    assert artifact["details"]["opset"] >= 17 and artifact["details"]["onnxruntime"]
    assert manifest.verify_files(manifest.read(out), out) == []


def build_cpu_shape(builder: list[str], model_folder, out):
    command = [sys.executable, *builder, "-i", str(model_folder), "-o", str(out), "-p", "int4", "-e", "cpu"]
    command += [
        "-c",
        str(out.parent / "cache"),
        "--extra_options",
        "hf_token=false",
        "block_size=32",
        "accuracy_level=4",
    ]
    subprocess.run(command, check=True, capture_output=True)
    model = onnx.load(out / "model.onnx")
    nodes = [(n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in model.graph.node]
    return nodes, {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}, model.opset_import


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_int4_pass_a_weight_at_a_time_writes_what_the_builders_own_pass_writes(tied, tmp_path):
    """edgeport runs onnxruntime-genai's builder with its int4 pass given one weight at a time (the builder's own
    pass holds every weight in float32 at once), a MatMul's in slices of its output columns (here 100 of the
    vocabulary's 384, 100 of the MLP's 128, the last slices ragged): the graph and every weight must come out the
    same."""
    model_folder = make_model(tmp_path / "model", "llama", tie_word_embeddings=tied)
    own_nodes, own_weights, own_opsets = build_cpu_shape(
        ["-m", "onnxruntime_genai.models.builder"], model_folder, tmp_path / "own"
    )
    in_slices = "import edgeport.convert.onnx_builder as b; b.SLICE_COLUMNS = 100; b.main()"
    nodes, weights, opsets = build_cpu_shape(["-c", in_slices], model_folder, tmp_path / "ours")
    assert sum(op == "MatMulNBits" for op, *_ in nodes) == 2 * 5 + 1
    assert nodes == own_nodes and opsets == own_opsets
    assert weights.keys() == own_weights.keys()
    for name, weight in weights.items():
        assert weight.dtype == own_weights[name].dtype, name
        np.testing.assert_array_equal(weight, own_weights[name], err_msg=name)


def test_cpu_runner_generates_what_the_logits_predict(cpu_output, tiny_llama):
    out, _ = cpu_output
    runner = ONNXRunner(out / "onnx")
    prompt = runner.tokenizer.encode("It was the best of times")
    tokens = list(runner.generate(prompt, 6))
    assert len(tokens) == 6 and tokens[-1].generated == 6 and tokens[-1].prompt_tokens == len(prompt)
    ids = list(prompt)
    for _ in range(6):  # greedy by hand, from the bare graph's logits
        ids.append(int(np.argmax(runner.logits(ids)[-1])))
    assert [t.id for t in tokens] == ids[len(prompt) :]


def test_static_graphs_have_fixed_shapes_chain_their_parts_and_match_transformers(float_static, tiny_llama):
    for part in ("01", "02"):
        for graph, width in ((f"prefill-{part}-of-02", 128), (f"decode-{part}-of-02", 1)):
            model = onnx.load(float_static / f"{graph}.onnx")
            for tensor in [*model.graph.input, *model.graph.output]:
                shape = tensor.type.tensor_type.shape.dim
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape]
                assert all(isinstance(d, int) and d > 0 for d in dims), (graph, tensor.name, dims)
            assert [d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim] == [1, 1, width, 256]
            names = [t.name for t in [*model.graph.input, *model.graph.output]]
            layer = int(part) - 1  # each part reads and returns its own layer's cache
            assert names[0] == ("input_ids" if part == "01" else "hidden_states")
            assert names[3:5] == [f"past_key_{layer}", f"past_value_{layer}"]
            assert names[5] == ("output_hidden_states" if part == "01" else "logits")
    runner = StaticKVRunner(float_static)
    ids = runner.tokenizer.encode("It was the best of times, it was the worst of times. " * 20)[:200]
    expected = reference_logits(tiny_llama, ids)
    np.testing.assert_allclose(runner.logits(ids), expected, atol=1e-4)  # two prefill chunks, the second padded


def test_joined_spans_run_as_one_part_as_they_ran_apart(float_static, tiny_llama, tmp_path):
    """Two spans exported apart (here a layer each) joined into one part: one graph a width that takes the token
    ids, reads and returns both layers' caches in order, and gives transformers' logits."""
    import shutil

    from edgeport.layouts import OnnxNPU, OnnxPart

    folder = tmp_path / "joined"
    shutil.copytree(float_static, folder)
    apart = OnnxNPU.read(folder)
    joined = replace(apart, parts=[OnnxPart("prefill-01-of-01.onnx", "decode-01-of-01.onnx", 0, 2)])
    for width in (apart.prefill_chunk, 1):
        files = [folder / part.graph(width) for part in apart.parts]
        onnx_convert.join_graphs(files, folder / joined.parts[0].graph(width))
        for file in files:
            file.unlink()  # the joined graph names the spans' weights files, not their graphs
    joined.write(folder)
    for graph in ("prefill-01-of-01", "decode-01-of-01"):
        model = onnx.load(folder / f"{graph}.onnx", load_external_data=False).graph
        assert [v.name for v in model.input] == ["input_ids", "position_ids", "attention_mask"] + [
            f"past_{kind}_{layer}" for layer in (0, 1) for kind in ("key", "value")
        ]
        assert [v.name for v in model.output] == ["logits"] + [
            f"new_{kind}_{layer}" for layer in (0, 1) for kind in ("key", "value")
        ]
    runner = StaticKVRunner(folder)
    ids = runner.tokenizer.encode("It was the best of times, it was the worst of times. " * 20)[:200]
    np.testing.assert_allclose(runner.logits(ids), reference_logits(tiny_llama, ids), atol=1e-4)


def test_a_part_quantized_in_spans_is_one_pair_of_graphs(tiny_llama, tmp_path, monkeypatch):
    """A part larger than the converter holds at once is exported, calibrated and quantized a unit at a time (the
    embedding and the head each alone, a slice of the vocabulary's rows at a time where larger than a unit), then
    joined: one pair of graphs and one weights file, giving the logits the part built whole gives."""
    from types import SimpleNamespace

    source = open_source(str(tiny_llama))
    target = replace(targets.load("snapdragon-8-elite"), context_length=256)
    step = SimpleNamespace(quantization="w4a16")
    whole = onnx_convert.convert(source, step, target, tmp_path / "whole")
    dims = source.family.dims(source.config)
    half = dims.vocab // 2  # an even vocabulary
    monkeypatch.setattr(onnx_convert, "UNIT_PARAMS", (half + 1) * dims.hidden)  # half a table; each layer alone
    units = onnx_convert.export_units(source, whole.layout.parts[0])
    slices = [(0, half), (half, dims.vocab)]
    assert [(u.start, u.stop, u.embedding, u.head, u.rows) for u in units] == [
        *[(0, 0, True, False, rows) for rows in slices],
        (0, 1, False, False, None),
        (1, 2, False, False, None),
        *[(2, 2, False, True, rows) for rows in slices],
    ]
    spans = onnx_convert.convert(source, step, target, tmp_path / "spans")
    assert [(p.first_layer, p.end_layer) for p in spans.layout.parts] == [(0, 2)]
    assert sorted(f.name for f in (tmp_path / "spans").glob("*.onnx*")) == [
        "decode-01-of-01.onnx",
        "prefill-01-of-01.onnx",
    ]
    # each unit reads the hidden states as the one before hands them over, never quantizing them twice; the
    # embedding's slices are summed (then quantized by the first layer) and the head's logits concatenated
    graph = onnx.load(tmp_path / "spans" / "prefill-01-of-01.onnx", load_external_data=False).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    twice = [n for n in graph.node if n.op_type == "QuantizeLinear" and made_by.get(n.input[0]) == "DequantizeLinear"]
    assert not twice
    joins = [(n.op_type, len(n.input)) for n in graph.node if n.op_type in ("Sum", "Concat") and "slice" in n.input[0]]
    assert joins == [("Sum", 2), ("Concat", 2)]
    ids = StaticKVRunner(tmp_path / "whole").tokenizer.encode("It was the age of wisdom, it was the age of foolishness")
    whole_logits, spans_logits = (StaticKVRunner(tmp_path / name).logits(ids) for name in ("whole", "spans"))
    np.testing.assert_allclose(spans_logits, whole_logits, atol=1e-5)  # the slices quantize as the whole
    assert np.abs(whole_logits - reference_logits(tiny_llama, ids)).max() > 1e-3  # the comparison can fail


def test_static_decode_loop_is_greedy_generation(float_static, tiny_llama):
    runner = StaticKVRunner(float_static)
    prompt = runner.tokenizer.encode("It was the age of wisdom")
    ours = runner.tokenizer.decode([t.id for t in runner.generate(prompt, 8)])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)  # stops at EOS too
    assert ours == runner.tokenizer.decode(theirs[0, len(prompt) :])


def test_the_windows_on_snapdragon_example_runs_the_parts_as_edgeport_does(float_static):
    import subprocess
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "windows-on-snapdragon" / "generate.py"
    request = "It was the age of wisdom"
    done = subprocess.run(
        [sys.executable, str(example), str(float_static), request], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "running on CPUExecutionProvider" in done.stderr  # no NPU here
    runner = StaticKVRunner(float_static)
    prompt = runner.tokenizer.encode(request)  # the example encodes with tokenizers, special tokens included
    tokens = [t for t in runner.generate(prompt, 40) if t.id != runner.tokenizer.eos_token_id]
    assert tokens and done.stdout.startswith(runner.tokenizer.decode([t.id for t in tokens]))


def test_static_cache_refuses_to_overflow(float_static):
    runner = StaticKVRunner(float_static)
    with pytest.raises(Exception, match="static KV cache holds 256 tokens"):
        runner.logits(list(range(1, 300)))


def test_npu_shape_is_qdq_at_the_planned_precision(npu_output):
    out, result = npu_output
    (artifact,) = result["artifacts"]
    quant = artifact["quantization"]
    details = artifact["details"]
    assert details["shape"] == "npu" and details["context_length"] == 4096 and details["opset"] >= 21
    for graph in ("prefill-01-of-01", "decode-01-of-01"):  # a tiny model is one part
        model = onnx.load(out / "onnx" / f"{graph}.onnx")
        initializers = {i.name: i for i in model.graph.initializer}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("DequantizeLinear") > 20 and "MatMulNBits" not in ops
        weight_types = set()
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                weight_types.add(initializers[node.input[0]].data_type)
        bits_type = onnx.TensorProto.UINT8 if quant == "w8a16" else onnx.TensorProto.INT4
        assert bits_type in weight_types
        activations = {
            i.data_type
            for n in model.graph.node
            if n.op_type == "QuantizeLinear"
            for i in initializers.values()
            if i.name == n.input[2]
        }
        assert activations == {onnx.TensorProto.UINT16}
        if quant == "w4a16":  # the output projection keeps 8-bit weights
            assert onnx.TensorProto.UINT8 in weight_types
    # the two graphs keep their weights in one file, each tensor once: no larger than one graph's weights
    shared = out / "onnx" / "weights-01-of-01.data"
    graph = onnx.load(out / "onnx" / "decode-01-of-01.onnx", load_external_data=False)
    one_copy = sum(int(e.value) for t in graph.graph.initializer for e in t.external_data if e.key == "length")
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == {shared.name}
    assert one_copy <= shared.stat().st_size <= one_copy + 4096 * len(graph.graph.initializer)
    assert not list((out / "onnx").glob("*.onnx.data"))


def _chain(folder, elements: int):
    """A graph of 24 elementwise ops on one float tensor of `elements`, and a feed for it."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, constants, previous = [], [], "x"
    for i in range(24):
        constants.append(numpy_helper.from_array(np.array([1 + i / 100], np.float32), f"c{i}"))
        nodes.append(helper.make_node("Mul" if i % 2 else "Add", [previous, f"c{i}"], [f"y{i}"]))
        previous = f"y{i}"
    tensor = [1, elements]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, tensor)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, tensor)],
        constants,
    )
    folder.mkdir()
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    onnx.save(model, folder / "chain.onnx")
    np.savez(folder / "feed.npz", x=np.random.default_rng(0).standard_normal(tensor, np.float32))
    return folder / "chain.onnx", [folder / "feed.npz"]


def _calibrated(folder, elements: int, stock: bool = False):
    """The chain's activation ranges and the memory calibrating it took, by edgeport's calibrater or onnxruntime's."""
    import resource

    import psutil
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.execution_providers import qnn

    model, feeds = _chain(folder, elements)
    config = qnn.get_qnn_qdq_config(model, None, activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8)
    before = psutil.Process().memory_info().rss
    if stock:
        calibrater = create_calibrator(model, config.op_types_to_quantize, folder / "augmented.onnx")
        calibrater.collect_data(onnx_convert._Reader(feeds))
        ranges = calibrater.compute_data()
    else:
        ranges = onnx_convert._ranges(model, config, folder / "augmented.onnx", feeds)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {name: (float(r.range_value[0]), float(r.range_value[1])) for name, r in ranges.data.items()}, grown


def test_calibration_holds_one_activation_at_a_time(tmp_path):
    """The NPU graphs' calibrater reduces each activation to its range as it is made: 24 activations of 32 MB each
    (onnxruntime's own calibrater holds all 768 MB of them) calibrate in a few of them, to the ranges onnxruntime's
    calibrater finds."""
    from edgeport import isolated

    _, grown = isolated.run("calibration", _calibrated, tmp_path / "big", 8 * 2**20)[0]
    assert grown < 200 * 2**20, f"{grown / 2**20:.0f} MB to calibrate"
    ours, _ = _calibrated(tmp_path / "ours", 1000)
    stock, _ = _calibrated(tmp_path / "stock", 1000, stock=True)
    assert ours == stock and len(ours) == 25


@pytest.mark.parametrize(
    "quant_type, signed",
    [(onnx.TensorProto.INT4, True), (onnx.TensorProto.UINT4, False), (onnx.TensorProto.UINT8, False)],
)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(80, 48), (33, 35)])  # rows not a whole number of blocks; an odd count
@pytest.mark.parametrize("chunk_values", [1 << 24, 100])  # whole, or a few rows at a time
def test_block_wise_weights_are_onnxruntimes_own_bytes(quant_type, signed, axis, shape, chunk_values, monkeypatch):
    """Block-wise weights (4-bit, and the 8-bit output projection of w4a16), quantized on whole arrays (or a few
    rows at a time), are byte for byte what onnxruntime writes."""
    from onnxruntime.quantization import quant_utils

    monkeypatch.setattr(onnx_convert, "QUANTIZE_CHUNK_VALUES", chunk_values)

    weight = (np.random.default_rng(0).standard_normal(shape) * 0.05).astype(np.float32)
    zero_point, scale = quant_utils.compute_scale_zp_blocked(weight, quant_type, axis, 32, signed)
    proto = onnx.numpy_helper.from_array(weight, "w")
    ours = onnx_convert._quantize_initializer(
        quant_utils.quantize_onnx_initializer, proto, quant_type, zero_point, scale, axis, block_size=32
    )
    assert ours == quant_utils.quantize_onnx_initializer(proto, quant_type, zero_point, scale, axis, block_size=32)


@pytest.mark.parametrize(
    "quant_type", [onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT4]
)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("chunk_values", [1 << 24, 100])
def test_per_channel_weights_are_onnxruntimes_own_bytes(quant_type, axis, chunk_values, monkeypatch):
    """Per-channel weights (8-bit; 16- and 4-bit as QNN's mixed precision may ask), quantized on whole arrays (or a
    few rows at a time), are byte for byte what onnxruntime writes."""
    from onnxruntime.quantization import quant_utils

    monkeypatch.setattr(onnx_convert, "QUANTIZE_CHUNK_VALUES", chunk_values)

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((40, 24)) * 0.05).astype(np.float32)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
    low, high = quant_utils.get_qmin_qmax_for_qType(quant_type)
    channels = weight.shape[axis]
    scale = rng.uniform(1e-4, 1e-3, channels).astype(np.float32)  # small enough that some values clip
    zero_point = rng.integers(low, high, channels, endpoint=True).astype(dtype)
    proto = onnx.numpy_helper.from_array(weight, "w")
    ours = onnx_convert._quantize_initializer(
        quant_utils.quantize_onnx_initializer, proto, quant_type, zero_point, scale, axis
    )
    assert ours == quant_utils.quantize_onnx_initializer(proto, quant_type, zero_point, scale, axis)


@pytest.mark.parametrize("quant_type", [onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.INT4])
@pytest.mark.parametrize("chunk_values", [1 << 24, 100])
def test_per_tensor_weights_are_onnxruntimes_own_bytes(quant_type, chunk_values, monkeypatch):
    """A weight with one scale (w4a16's 16-bit embedding table), quantized a few rows at a time, is byte for byte
    what onnxruntime writes."""
    from onnxruntime.quantization import quant_utils

    monkeypatch.setattr(onnx_convert, "QUANTIZE_CHUNK_VALUES", chunk_values)
    weight = (np.random.default_rng(0).standard_normal((41, 24)) * 0.05).astype(np.float32)
    low, high = quant_utils.get_qmin_qmax_for_qType(quant_type)
    zero_point, scale = quant_utils.compute_scale_zp(weight.min(), weight.max(), low, high)
    zero_point = np.array(zero_point, onnx.helper.tensor_dtype_to_np_dtype(quant_type))
    proto = onnx.numpy_helper.from_array(weight, "w")
    ours = onnx_convert._quantize_initializer(
        quant_utils.quantize_onnx_initializer, proto, quant_type, zero_point, scale
    )
    assert ours == quant_utils.quantize_onnx_initializer(proto, quant_type, zero_point, scale)


def test_npu_parity_runs_the_qdq_graphs_on_cpu_and_says_qnn_did_not(npu_output):
    _, result = npu_output
    (artifact,) = result["artifacts"]
    parity = artifact["parity"]
    assert parity["status"] == "passed", parity["failures"]
    assert parity["not_checked"] and parity["not_checked"][0].startswith(QNN_ABSENT)
    assert "CPUExecutionProvider" in parity["method"]


def test_bench_on_both_shapes(cpu_output, npu_output):
    for out, _ in (cpu_output, npu_output):
        code, stdout, err = run_cli(
            "bench", str(out), "--prompt-tokens", "140", "--max-tokens", "4", "--runs", "1", "--json"
        )
        assert code == 0, err
        bench = json.loads(stdout)
        (row,) = bench["results"]
        assert row["new_tokens"] == 4 and row["decode_tps"] > 0 and row["peak_memory_gb"] > 0
    assert "not NPU figures" in bench["note"]  # the last one is the NPU shape on the CPU EP


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac MLX runs at its speed and joins the race")
def test_host_bench_races_the_cpu_artifacts_but_not_mlx_off_a_mac(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path / "cache"))  # the race's order stays out of the suite's cache
    out = tmp_path / "all"
    result = convert(tiny_llama, out, "host")
    assert [a["format"] for a in result["artifacts"]] == ["onnx", "gguf", "mlx"]
    code, stdout, err = run_cli(
        "bench", str(out), "--prompt-tokens", "64", "--max-tokens", "2", "--runs", "1", "--json"
    )
    assert code == 0, err
    assert {r["format"] for r in json.loads(stdout)["raced"]} == {"onnx", "gguf"}  # MLX's CPU build sits out


def test_float_cpu_shape_is_fp32(tiny_qwen2, tmp_path):
    code, _, err = run_cli(
        "convert", str(tiny_qwen2), "-t", "host", "-f", "onnx", "--quant", "fp16", "-o", str(tmp_path / "x")
    )
    assert code != 0 and "issue 2009" in err and not (tmp_path / "x").exists()
    result = convert(tiny_qwen2, tmp_path / "o", "host", "-f", "onnx", "--quant", "fp32")
    (artifact,) = result["artifacts"]
    assert artifact["details"]["shape"] == "cpu" and artifact["parity"]["status"] == "passed"
    assert artifact["parity"]["metrics"]["top1_agreement"] >= 0.98
