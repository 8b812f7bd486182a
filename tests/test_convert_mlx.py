"""MLX conversion for real (MLX's CPU build), on tiny models built from configs."""

import hashlib
import json

import mlx_lm
import numpy as np
import pytest
from conftest import make_model, run_cli

from edgeport import manifest
from edgeport.engines.mlx import MLXRunner


def convert(model, out, *extra):
    code, stdout, err = run_cli(
        "convert", str(model), "-t", "host", "--formats", "mlx", "--out", str(out), "--json", *extra
    )
    assert code == 0, err
    return json.loads(stdout)


@pytest.fixture(scope="module")
def q4_output(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny-q4"
    return out, convert(tiny_llama, out)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_fp16_artifact_loads_in_mlx_lm_and_matches_the_source(fixture, request, tmp_path):
    out = tmp_path / "out"
    result = convert(request.getfixturevalue(fixture), out, "--quant", "fp16")
    (artifact,) = result["artifacts"]
    assert (artifact["format"], artifact["quantization"], artifact["path"]) == ("mlx", "fp16", "mlx")
    assert artifact["parity"]["status"] == "passed"
    assert artifact["parity"]["metrics"]["top1_agreement"] >= 0.98  # a random tiny model has near-ties
    assert artifact["parity"]["not_checked"] == ["MLX on Metal (measured on MLX's CPU backend)"]
    model, tokenizer = mlx_lm.load(str(out / "mlx"))
    assert mlx_lm.generate(model, tokenizer, "It was the best", max_tokens=3) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_manifest_is_valid_and_its_hashes_are_right(q4_output, tiny_llama):
    out, result = q4_output
    assert manifest.read(out).to_dict() == result
    assert (
        result["source"]["sha256"]["model.safetensors"]
        == hashlib.sha256((tiny_llama / "model.safetensors").read_bytes()).hexdigest()
    )
    (artifact,) = result["artifacts"]
    for entry in artifact["files"]:
        data = (out / entry["path"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert result["not_built"] == []
    assert {"torch", "transformers", "mlx", "mlx-lm"} <= set(result["tools"])


def test_planned_weight_bytes_match_the_artifact(q4_output):
    out, result = q4_output
    files = (out / "mlx").glob("*.safetensors")
    weights = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in files)  # less headers
    assert result["plan"]["steps"][0]["weight_bytes"] == pytest.approx(weights, rel=0.05)


def test_dequantized_parity_equals_mlx_quantized_kernels(q4_output):
    """Off a Mac parity runs the dequantized weights in float32; this checks that it computes what the
    quantized kernels compute."""
    out, _ = q4_output
    ids = list(range(5, 40))
    kernels = MLXRunner(out / "mlx").logits(ids)
    dequantized = MLXRunner(out / "mlx", dequantize=True).logits(ids)
    assert np.abs(kernels - dequantized).max() < 2e-2 * np.abs(dequantized).max()
    assert (kernels.argmax(-1) == dequantized.argmax(-1)).mean() > 0.95


def test_the_artifacts_weights_in_transformers_compute_what_mlx_lm_does(q4_output, tiny_llama):
    """Off a Mac parity runs the artifact's weights, dequantized, in the source's architecture in transformers
    (MLX's CPU build multiplies matrices some 70 times slower than torch here); mlx-lm's own model on the same
    dequantized weights computes the same logits."""
    from edgeport.engines.mlx import _in_transformers
    from edgeport.source import open_source

    out, _ = q4_output
    ids = list(range(5, 40))
    in_transformers = _in_transformers(open_source(str(tiny_llama)), out / "mlx")
    in_mlx = MLXRunner(out / "mlx", dequantize=True).logits(ids)
    np.testing.assert_allclose(in_transformers.logits(ids), in_mlx, atol=1e-4 * np.abs(in_mlx).max())


def test_rows_of_the_artifacts_tables_read_alone_are_those_rows_of_the_whole(q4_output, monkeypatch):
    """The paged parity reads a vocabulary's table a slice of rows at a time: dequantized, those rows are the same."""
    from edgeport.engines import mlx

    monkeypatch.setattr(mlx, "DEQUANTIZE_ROWS", 3)  # slices that cross the dequantizer's own
    out, _ = q4_output
    checkpoint = mlx.MLXCheckpoint(out / "mlx")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(checkpoint.read(name, slice(5, 12)), checkpoint.read(name)[5:12])


def test_q4_parity_is_measured_and_judged_by_the_table(q4_output):
    _, result = q4_output
    parity = result["artifacts"][0]["parity"]
    assert parity["bounds"] == {"top1_agreement": 0.5, "kl_mean": 1.2, "ppl_delta": 0.6}
    assert parity["status"] == ("failed" if parity["failures"] else "passed")
    assert "dequantized" in parity["not_checked"][0] and "with the MLX artifact's weights" in parity["method"]


def test_inspect_verifies_and_catches_a_changed_file(q4_output, tmp_path):
    import shutil

    out, _ = q4_output
    copy = shutil.copytree(out, tmp_path / "copy")
    code, stdout, _ = run_cli("inspect", str(copy))
    assert code == 0 and "files verified" in stdout
    (copy / "mlx" / "config.json").write_text("{}")
    code, stdout, _ = run_cli("inspect", str(copy))
    assert code == 1 and "mlx/config.json: changed since conversion" in stdout


def test_mixed_recipe(tiny_llama, tmp_path):
    result = convert(tiny_llama, tmp_path / "out", "--quant", "mixed_3_6")
    config = json.loads((tmp_path / "out" / "mlx" / "config.json").read_text())
    bits = {v["bits"] for v in config["quantization"].values() if isinstance(v, dict)}
    assert bits == {3, 6} and result["artifacts"][0]["quantization"] == "mixed_3_6"


def test_force_replaces(tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, out, "--quant", "fp16")
    convert(tiny_llama, out, "--quant", "q8", "--force")
    assert manifest.read(out).artifacts[0].quantization == "q8"


def test_bench_then_check_against_host(q4_output, tmp_path):
    import shutil

    out = shutil.copytree(q4_output[0], tmp_path / "o")
    code, stdout, err = run_cli(
        "bench", str(out), "--prompt-tokens", "96", "--max-tokens", "8", "--runs", "2", "--json"
    )
    assert code == 0, err
    bench = json.loads(stdout)
    (result,) = bench["results"]
    assert result["prompt_tokens"] <= 96 and result["new_tokens"] == 8
    assert result["ttft_s"] > 0 and result["prefill_tps"] > 0 and result["decode_tps"] > 0
    assert result["peak_rss_gb"] > 0 and bench["machine"]["system"]
    assert json.loads((out / "bench.json").read_text()) == bench

    code, stdout, _ = run_cli("check", str(out), "-t", "host", "--json")
    verdict = json.loads(stdout)
    statuses = {line["budget"]: line["status"] for line in verdict["lines"]}
    assert statuses["time to first token"] == "not checked"  # a 96-token bench cannot vouch for 512 tokens
    assert statuses["peak memory"] == "met" and not verdict["met"]
    assert code == (1 if "missed" in statuses.values() else 2)  # missed beats could-not-judge


def test_a_parity_failure_is_kept_marked_and_exits_non_zero(tmp_path):
    """A model whose logits overflow float16 (65504) really fails parity as fp16."""
    from safetensors.numpy import load_file, save_file

    model = make_model(tmp_path / "loud", "llama")
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"] *= 1e5
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--quant", "fp16", "--out", str(out))
    assert code == 1 and "parity failed for mlx fp16 (kl_mean nan > 0.005" in err and "--allow-parity-fail" in err
    assert manifest.read(out).artifacts[0].parity.status == "failed"
    code, _, _ = run_cli(
        "convert",
        str(model),
        "-t",
        "host",
        "-f",
        "mlx",
        "--quant",
        "fp16",
        "--out",
        str(out),
        "--force",
        "--allow-parity-fail",
    )
    assert code == 0


def test_another_group_size(tiny_llama, tmp_path):
    result = convert(tiny_llama, tmp_path / "out", "--quant", "q4-g32")
    config = json.loads((tmp_path / "out" / "mlx" / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    artifact = result["artifacts"][0]
    assert artifact["quantization"] == "q4-g32" and artifact["parity"]["bounds"]["top1_agreement"] == 0.5
    code, _, err = run_cli("plan", str(tiny_llama), "-t", "host", "--quant", "q4-g48")
    assert code == 3 and "--quant q4-g48: not available for onnx, gguf, mlx" in err


def test_a_family_the_traced_formats_do_not_take_is_built_as_mlx_and_the_rest_listed(tmp_path):
    """OLMo 2 (norms on its queries and keys) is planned for every format of m2-air; MLX builds and passes parity,
    Core ML and GGUF are listed as not built, with why."""
    model = make_model(tmp_path / "olmo2", "olmo2")
    code, out, err = run_cli("convert", str(model), "-t", "m2-air", "--out", str(tmp_path / "out"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(a["format"], a["parity"]["status"]) for a in result["artifacts"]] == [("mlx", "passed")]
    assert [n["format"] for n in result["not_built"]] == ["coreml", "gguf"]
    assert "does not trace olmo2 yet" in result["not_built"][0]["reason"]
    assert "GGUF writer does not map olmo2" in result["not_built"][1]["reason"]
