"""Core ML conversion for real on tiny models: coremltools converts, compresses and saves here; the package is then
checked by its structure and by its weights read back, since only macOS can run it."""

import itertools
import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import LLAMA_3_1_8B, assert_weights_read_alone_are_the_programs, run_cli
from transformers import AutoModelForCausalLM

from edgeport.convert import coreml
from edgeport.engines.coreml import NEEDS_MACOS as COREML_NEEDS_MACOS
from edgeport.engines.coreml import CoreMLRunner, read_weights
from edgeport.engines.reference import running_only
from edgeport.families.causal_lm import LMDims

pytestmark = pytest.mark.skipif(sys.platform == "darwin", reason="checks what Linux reports in place of prediction")


def convert(model, out, target, *extra):
    code, stdout, err = run_cli(
        "convert", str(model), "-t", target, "-f", "coreml", "--out", str(out), "--json", *extra
    )
    assert code == 0, err
    (artifact,) = json.loads(stdout)["artifacts"]
    return artifact


@pytest.fixture(scope="module")
def gpu_package(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "m2-air"
    return out, convert(tiny_llama, out, "m2-air")


@pytest.fixture(scope="module")
def ane_package(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "iphone"
    return out, convert(tiny_qwen2, out, "iphone-15-pro")


def test_gpu_shape_is_one_flexible_stateful_function(gpu_package):
    _, artifact = gpu_package
    details = artifact["details"]
    assert (details["deployment_target"], details["compute_units"]) == ("macOS15", "CPU_AND_GPU")
    (package,) = details["packages"].values()  # a tiny model is one chunk
    (main,) = package["functions"].values()
    inputs = {i["name"]: i["shape"] for i in main["inputs"]}
    assert inputs == {"input_ids": [1, "1..4096"], "causal_mask": [1, 1, "1..4096", "1..4096"], "position": [1]}
    assert [s["name"] for s in main["states"]] == ["keyCache", "valueCache"]
    assert main["states"][0]["shape"] == [2, 1, 2, 4096, 16]  # layers, batch, KV heads, context, head dim
    assert details["sdpa_ops"] == 2  # one fused attention per layer


def test_neural_engine_shape_is_two_static_functions_over_one_state(ane_package):
    _, artifact = ane_package
    details = artifact["details"]
    assert details["compute_units"] == "CPU_AND_NE" and details["prefill_chunk"] == 64
    (package,) = details["packages"].values()
    functions = package["functions"]
    assert set(functions) == {"prefill", "decode"}
    assert functions["prefill"]["inputs"][1]["shape"] == [1, 1, 64, 4096]
    assert functions["decode"]["inputs"][1]["shape"] == [1, 1, 1, 4096]
    assert functions["prefill"]["states"] == functions["decode"]["states"]


@pytest.mark.parametrize("package", ["gpu_package", "ane_package"])
def test_every_matrix_is_int4_blocks_and_the_app_has_what_it_needs(package, request):
    _, artifact = request.getfixturevalue(package)
    # 2 layers x 7 projections, the embedding and the output head: all int4 in blocks of 32, none left in fp16
    assert artifact["details"]["weight_matrices_by_storage"] == {"constexpr_blockwise_shift_scale": 16}
    files = {f["path"].split("/", 1)[1] for f in artifact["files"]}
    assert {"tokenizer.json", "chat_template.jinja", "coreml.json", "config.json"} <= files
    assert any(f.startswith("model-01-of-01.mlpackage/") for f in files)


@pytest.mark.parametrize("package", ["gpu_package", "ane_package"])
def test_weight_parity_is_measured_and_prediction_is_reported_not_checked(package, request):
    _, artifact = request.getfixturevalue(package)
    parity = artifact["parity"]
    assert parity["status"] == "passed", parity["failures"]
    assert parity["not_checked"][0].startswith(COREML_NEEDS_MACOS)
    assert "read back and decompressed" in parity["method"]


def test_weights_read_back_are_the_int4_blocks_of_the_source(gpu_package, tiny_llama):
    out, _ = gpu_package
    source = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    names = [n for n, _ in source.named_parameters()]
    weights = read_weights(out / "coreml" / "model-01-of-01.mlpackage", names)
    original = dict(source.named_parameters())["model.layers.1.mlp.down_proj.weight"].detach().numpy()
    stored = weights["model.layers.1.mlp.down_proj.weight"]
    blocks = original.reshape(original.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 7  # symmetric int4: 7 steps either side of zero
    error = np.abs(stored.reshape(blocks.shape) - blocks)
    assert np.all(error <= step / 2 + 1e-3) and np.any(error > 0)  # rounded to the grid, and really quantized
    assert len(np.unique(stored.reshape(blocks.shape)[0, 0])) <= 16


def test_weights_read_alone_and_decompressed_a_slice_of_rows_at_a_time_are_the_programs(
    gpu_package, tmp_path, monkeypatch
):
    from edgeport.engines import coreml as engine

    monkeypatch.setattr(engine, "DECOMPRESS_VALUES", 5 * 64)  # a few rows of the tiny model's matrices
    out, _ = gpu_package
    program = assert_weights_read_alone_are_the_programs(out / "coreml" / "model-01-of-01.mlpackage", tmp_path / "w")
    assert program["model_lm_head_weight"].op_type == "constexpr_blockwise_shift_scale"


def test_rows_of_the_packages_tables_read_alone_are_those_rows_of_the_whole(gpu_package, tiny_llama):
    from edgeport.engines.coreml import PackageWeights
    from edgeport.source import open_source

    out, _ = gpu_package
    weights = PackageWeights(open_source(str(tiny_llama)), out / "coreml", ["model-01-of-01.mlpackage"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(weights.read(name, slice(5, 12)), weights.read(name)[5:12])


@pytest.mark.parametrize(
    "quant, storage",
    [
        ("int8-channel", "constexpr_blockwise_shift_scale"),
        ("palettize4", "constexpr_lut_to_dense"),
        ("fp16", "const fp16"),
    ],
)
def test_other_compressions(quant, storage, tiny_llama, tmp_path):
    artifact = convert(tiny_llama, tmp_path / "o", "m2-air", "--quant", quant)
    assert set(artifact["details"]["weight_matrices_by_storage"]) == {storage}
    assert artifact["parity"]["status"] == "passed", artifact["parity"]["failures"]


def test_bench_refuses_off_macos(gpu_package):
    out, _ = gpu_package
    code, _, err = run_cli("bench", str(out))
    assert code == 3 and COREML_NEEDS_MACOS in err and "Traceback" not in err
    with pytest.raises(Exception, match=COREML_NEEDS_MACOS):
        CoreMLRunner(out / "coreml")


@pytest.mark.parametrize(
    "quant, storage", [("int8-channel", "constexpr_affine_dequantize"), ("palettize4", "constexpr_lut_to_dense")]
)
def test_before_ios_18_the_cache_is_inputs_and_outputs(quant, storage, tiny_llama, tmp_path):
    from edgeport import targets
    from edgeport.plan import make_plan
    from edgeport.source import open_source

    source = open_source(str(tiny_llama))
    target = replace(targets.load("iphone-15-pro"), coreml_deployment="iOS17")
    step = make_plan(source, target, ["coreml"], quant).steps[0]
    artifact = coreml.convert(source, step, target, tmp_path / "coreml")
    details = artifact.details
    assert details["kv_cache"] == "inputs and outputs" and details["prefill_chunk"] is None  # no multifunction
    ((main,),) = [p["functions"].values() for p in details["packages"].values()]
    assert [i["name"] for i in main["inputs"]] == ["input_ids", "causal_mask", "position", "keyCache", "valueCache"]
    assert [o["name"] for o in main["outputs"]] == ["logits", "keyCacheOut", "valueCacheOut"]
    assert main["states"] == [] and details["sdpa_ops"] == 0  # the fused op is iOS 18's
    assert set(details["weight_matrices_by_storage"]) == {storage}
    (package,) = (tmp_path / "coreml").glob("*.mlpackage")
    assert_weights_read_alone_are_the_programs(package, tmp_path / "weights")
    with pytest.raises(Exception, match="int4-block32 needs iOS 18"):
        coreml.convert(source, make_plan(source, target, ["coreml"]).steps[0], target, tmp_path / "again")


def test_each_weight_compressed_hands_back_the_checkpoint_pages_it_was_read_from(tiny_llama, tmp_path, monkeypatch):
    from edgeport import targets
    from edgeport.plan import make_plan
    from edgeport.source import open_source

    paged_out = []
    monkeypatch.setattr(coreml, "page_out_checkpoints", lambda: paged_out.append(1))
    source, target = open_source(str(tiny_llama)), targets.load("m2-air")
    artifact = coreml.convert(source, make_plan(source, target, ["coreml"]).steps[0], target, tmp_path / "coreml")
    compressed = artifact.details["weight_matrices_by_storage"]["constexpr_blockwise_shift_scale"]
    assert len(paged_out) >= compressed > 0


@pytest.mark.parametrize("stateless", [False, True])
def test_the_traced_wrapper_computes_what_the_source_does(stateless, tiny_qwen2):
    """What Core ML runs, run in torch: chunked prefill then decode over the cache, against one full pass."""
    from transformers import AttentionInterface

    AttentionInterface.register("edgeport_fused_sdpa", coreml.fused_sdpa)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_qwen2, dtype=torch.float32, attn_implementation="edgeport_fused_sdpa"
    )
    dims = LMDims.from_config(model.config.to_dict())
    wrapper = coreml.StatefulCausalLM(model, dims.cache_shape(64)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)(ids).logits[0]
    caches = (wrapper.keyCache.clone(), wrapper.valueCache.clone()) if stateless else ()
    got, position = [], 0
    for width in (8, 8, 1, 1, 1, 1):
        mask = torch.full((1, 1, width, position + width), float("-inf"))
        for row in range(width):
            mask[0, 0, row, : position + row + 1] = 0
        with torch.no_grad():
            out = wrapper(ids[:, position : position + width].int(), mask, torch.tensor([position]), *caches)
        if stateless:
            out, *caches = out
        got.append(out[0])
        position += width
    np.testing.assert_allclose(torch.cat(got).numpy(), expected.detach().numpy(), atol=2e-2)  # the cache is fp16


def test_weight_sharing_compares_arrays_a_slice_at_a_time_as_numpy_does_whole(monkeypatch):
    from edgeport.convert.coreml import _ChunkedAllclose

    monkeypatch.setattr(_ChunkedAllclose, "SLICE", 7)
    lean = _ChunkedAllclose(np)
    a = np.arange(50, dtype=np.int8).reshape(5, 10)
    b = a.copy()
    assert lean.allclose(a, b, rtol=0.0, atol=1e-12) and lean.arange is np.arange
    b[4, 9] += 1  # in the last slice
    assert not lean.allclose(a, b, rtol=0.0, atol=1e-12)
    assert lean.allclose(a, b, rtol=0.0, atol=1.0) == np.allclose(a, b, rtol=0.0, atol=1.0)
    assert lean.allclose(np.zeros((3, 1)), np.zeros(4))  # broadcast: compared whole


def test_layer_spans_are_the_fewest_within_the_bound_and_balanced():
    from edgeport.families.causal_lm import layer_spans

    llama_8b = LLAMA_3_1_8B
    spans = layer_spans(llama_8b, 5e8)
    assert [(s.start, s.stop) for s in spans][:2] == [(0, 1), (1, 3)] and spans[-1].stop == 32
    assert all(a.stop == b.start for a, b in itertools.pairwise(spans))
    layer = 218_112_000  # 4 attention and 3 MLP projections and two norms
    assert spans[1].params == 2 * layer and spans[0].params == layer + 128256 * 4096  # with the embedding
    assert sum(s.params for s in spans) == 8_030_261_248  # untied: every weight in one chunk
    assert len(layer_spans(llama_8b, 1e12)) == 1
    assert len(layer_spans(llama_8b, 1)) == 32  # a layer larger than the bound is a span of its own
    # fewest spans, and no larger than needed: 4 layers of 1B in 3 spans of sizes 2, 1, 1 would be as few but larger
    spans = layer_spans({**llama_8b, "num_hidden_layers": 4, "vocab_size": 8}, 2.5 * layer)
    assert [s.stop - s.start for s in spans] == [2, 2]


def test_the_npu_shapes_units_hold_the_embedding_and_the_head_alone_in_slices_of_rows_where_they_are_large():
    from edgeport.families.causal_lm import UNIT_PARAMS, split_span

    layer, vocab = 218_112_000, 128256  # Llama-3.1-8B's: each table larger than a layer, a layer than a unit
    units = split_span(LLAMA_3_1_8B, 0, 32, UNIT_PARAMS)
    tables = [u for u in units if u.start == u.stop]
    assert [(u.start, u.embedding, u.head) for u in tables] == [(0, True, False)] * 5 + [(32, False, True)] * 5
    for kind in (tables[:5], tables[5:]):  # even slices of rows, in order, covering the vocabulary once
        assert [u.rows for u in kind] == [(i * 25652, min((i + 1) * 25652, vocab)) for i in range(5)]
    assert all(u.params <= UNIT_PARAMS for u in tables)
    assert [(u.start, u.stop, u.params) for u in units[5:-5]] == [(i, i + 1, layer) for i in range(32)]
    assert sum(u.params for u in units) == 8_030_261_248 + 4 * 4096  # the head's slices each with the final norm
    # a part in the middle has neither; a small model's embedding and head go with its layers
    assert [(u.start, u.stop) for u in split_span(LLAMA_3_1_8B, 4, 8, 2.5 * layer)] == [(4, 6), (6, 8)]
    small = {**LLAMA_3_1_8B, "num_hidden_layers": 2, "vocab_size": 8}
    assert [(u.embedding, u.head, u.rows) for u in split_span(small, 0, 2, 1e12)] == [(True, True, None)]


def chunky_target(tmp_path, chunk_gb=1e-7):
    """The iPhone's profile with a package bound so small that each layer of a tiny model is a chunk of its own."""
    from edgeport.targets import _profiles

    text = (_profiles() / "iphone-15-pro.toml").read_text()
    text = text.replace("coreml_chunk_gb = 0.25", f"coreml_chunk_gb = {chunk_gb}").replace(
        'name = "iphone-15-pro"', 'name = "chunky"'
    )
    file = tmp_path / "chunky.toml"
    file.write_text(text)
    return file


def test_a_model_past_the_package_bound_is_chunks_of_layers_run_in_order(tiny_qwen2, tmp_path):
    out = tmp_path / "chunks"
    artifact = convert(tiny_qwen2, out, str(chunky_target(tmp_path)))
    layout = json.loads((out / "coreml" / "coreml.json").read_text())
    assert [(c["package"], c["first_layer"], c["end_layer"]) for c in layout["chunks"]] == [
        ("model-01-of-02.mlpackage", 0, 1),
        ("model-02-of-02.mlpackage", 1, 2),
    ]
    first, last = (artifact["details"]["packages"][c["package"]]["functions"] for c in layout["chunks"])
    assert [i["name"] for i in first["decode"]["inputs"]] == ["input_ids", "causal_mask", "position"]
    assert [o["name"] for o in first["prefill"]["outputs"]] == ["output_hidden_states"]
    assert [i["name"] for i in last["decode"]["inputs"]] == ["hidden_states", "causal_mask", "position"]
    assert [o["name"] for o in last["decode"]["outputs"]] == ["logits"]
    assert last["prefill"]["states"][0]["shape"] == [1, 1, 2, 4096, 16]  # its own layer's cache
    # 2 layers x 7 projections, the embedding in the first chunk and the (tied) output head in the last
    assert artifact["details"]["weight_matrices_by_storage"] == {"constexpr_blockwise_shift_scale": 16}
    parity = artifact["parity"]
    assert parity["status"] == "passed", parity["failures"]
    assert "2 packages read back" in parity["method"]


def test_a_layout_naming_a_package_outside_its_folder_is_refused(tmp_path):
    from edgeport.errors import EdgeportError
    from edgeport.layouts import CoreMLModel

    (tmp_path / "coreml.json").write_text(
        json.dumps(
            {
                "compute_units": "CPU_AND_GPU",
                "prefill_chunk": None,
                "context_length": 64,
                "kv_cache": "state",
                "cache_shape": [1, 1, 1, 64, 8],
                "chunks": [{"package": "../../victim.mlpackage", "first_layer": 0, "end_layer": 1}],
            }
        )
    )
    with pytest.raises(EdgeportError, match="convert again"):
        CoreMLModel.read(tmp_path)


@pytest.mark.parametrize("stateless", [False, True])
def test_chunks_chained_compute_what_the_source_does(stateless, tiny_qwen2):
    """What Core ML runs for a model in two chunks, run in torch: each chunk's wrapper over its own cache, the
    hidden states passed on, against one full pass."""
    from transformers import AttentionInterface

    from edgeport.layouts import CoreMLChunk

    AttentionInterface.register(coreml.ATTENTION, coreml.fused_sdpa)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32, attn_implementation=coreml.ATTENTION)
    coreml.in_half(model)  # as it is converted
    dims = LMDims.from_config(model.config.to_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)(ids).logits[0]
    chunks = [CoreMLChunk("a.mlpackage", 0, 1), CoreMLChunk("b.mlpackage", 1, 2)]
    wrappers, caches = [], []
    for chunk in chunks:
        wrapper = coreml.StatefulCausalLM(
            model, (1, *dims.cache_shape(64)[1:]), chunk.first_layer, chunk.end_layer == 2
        )
        wrappers.append(wrapper.eval())
        caches.append([wrapper.keyCache.clone(), wrapper.valueCache.clone()] if stateless else [])
    got, position = [], 0
    for width in (8, 8, 1, 1, 1, 1):
        mask = torch.full((1, 1, width, position + width), float("-inf"))
        for row in range(width):
            mask[0, 0, row, : position + row + 1] = 0
        out = ids[:, position : position + width].int()
        for chunk, wrapper, cache in zip(chunks, wrappers, caches, strict=True):
            with torch.no_grad(), running_only(model, chunk.first_layer, chunk.end_layer):
                out = wrapper(out, mask, torch.tensor([position]), *cache)
            if stateless:
                out, *cache[:] = out
        got.append(out[0])
        position += width
    np.testing.assert_allclose(torch.cat(got).numpy(), expected.detach().numpy(), atol=2e-2)  # the cache is fp16


def test_a_tied_output_projection_is_read_back_from_the_embedding_core_ml_keeps_for_both(tmp_path):
    """In one package Core ML keeps one of the two equal tensors; in chunks each end has its own copy."""
    from conftest import make_model

    model = make_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    for target, matrices in (("m2-air", 15), (str(chunky_target(tmp_path)), 16)):
        artifact = convert(model, tmp_path / f"o{matrices}", target)
        assert artifact["details"]["weight_matrices_by_storage"] == {"constexpr_blockwise_shift_scale": matrices}
        assert artifact["parity"]["status"] == "passed", artifact["parity"]["failures"]
