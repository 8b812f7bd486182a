"""Core ML conversion for real on tiny models: coremltools converts, compresses and saves here; the package is then
checked by its structure and by its weights read back, since only macOS can run it."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM

from edgeport.convert import coreml
from edgeport.engines.coreml import NEEDS_MACOS as COREML_NEEDS_MACOS
from edgeport.engines.coreml import CoreMLRunner, read_weights
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
    (main,) = details["functions"].values()
    inputs = {i["name"]: i["shape"] for i in main["inputs"]}
    assert inputs == {"input_ids": [1, "1..4096"], "causal_mask": [1, 1, "1..4096", "1..4096"], "position": [1]}
    assert [s["name"] for s in main["states"]] == ["keyCache", "valueCache"]
    assert main["states"][0]["shape"] == [2, 1, 2, 4096, 16]  # layers, batch, KV heads, context, head dim
    assert details["sdpa_ops"] == 2  # one fused attention per layer


def test_neural_engine_shape_is_two_static_functions_over_one_state(ane_package):
    _, artifact = ane_package
    details = artifact["details"]
    assert details["compute_units"] == "CPU_AND_NE" and details["prefill_chunk"] == 64
    functions = details["functions"]
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
    assert any(f.startswith("model.mlpackage/") for f in files)


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
    weights = read_weights(out / "coreml" / "model.mlpackage", names)
    original = dict(source.named_parameters())["model.layers.1.mlp.down_proj.weight"].detach().numpy()
    stored = weights["model.layers.1.mlp.down_proj.weight"]
    blocks = original.reshape(original.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 7  # symmetric int4: 7 steps either side of zero
    error = np.abs(stored.reshape(blocks.shape) - blocks)
    assert np.all(error <= step / 2 + 1e-3) and np.any(error > 0)  # rounded to the grid, and really quantized
    assert len(np.unique(stored.reshape(blocks.shape)[0, 0])) <= 16


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
    (main,) = details["functions"].values()
    assert [i["name"] for i in main["inputs"]] == ["input_ids", "causal_mask", "position", "keyCache", "valueCache"]
    assert [o["name"] for o in main["outputs"]] == ["logits", "keyCacheOut", "valueCacheOut"]
    assert main["states"] == [] and details["sdpa_ops"] == 0  # the fused op is iOS 18's
    assert set(details["weight_matrices_by_storage"]) == {storage}
    with pytest.raises(Exception, match="int4-block32 needs iOS 18"):
        coreml.convert(source, make_plan(source, target, ["coreml"]).steps[0], target, tmp_path / "again")


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
