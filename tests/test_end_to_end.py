"""The real fixture (SmolLM2-135M-Instruct, GGUF Q4_1) through convert, inspect, bench and check."""

import hashlib
import json

import pytest
from conftest import run_cli

from edgeport.machine import cpu_arch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(fixture_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-m2-air"
    code, stdout, err = run_cli("convert", str(fixture_gguf), "--target", "m2-air", "--out", str(out), "--json")
    assert code == 0, err
    return out, json.loads(stdout)


def test_convert_for_m2_air_builds_4bit_mlx_core_ml_and_gguf_within_parity_bounds(converted, fixture_gguf):
    _, result = converted
    mlx, coreml, gguf = result["artifacts"]
    assert (mlx["format"], mlx["quantization"]) == ("mlx", "q4")
    assert (coreml["format"], coreml["quantization"]) == ("coreml", "int4-block32")
    assert (gguf["format"], gguf["quantization"]) == ("gguf", "Q4_K_M")
    assert gguf["parity"]["not_checked"] == [f"llama.cpp on Metal (measured on {cpu_arch()} CPUs)"]
    assert gguf["details"]["tokenizer_checked_tokens"] > 50  # llama.cpp splits the check text as the source does
    for artifact in (mlx, coreml, gguf):
        parity = artifact["parity"]
        assert parity["status"] == "passed", parity["failures"]
        assert parity["metrics"]["top1_agreement"] >= parity["bounds"]["top1_agreement"]
        assert parity["metrics"]["ppl_source"] < 30  # the source itself reads English well
    assert result["not_built"] == []
    # every projection of the 30 layers and the tied embedding: int4 in blocks of 32
    assert coreml["details"]["weight_matrices_by_storage"] == {"constexpr_blockwise_shift_scale": 30 * 7 + 1}
    assert coreml["details"]["sdpa_ops"] == 30
    (package,) = coreml["details"]["packages"].values()  # 135M parameters: one chunk
    (main,) = package["functions"].values()
    assert [s["shape"] for s in main["states"]] == [[30, 1, 3, 4096, 64]] * 2
    digest = hashlib.sha256(fixture_gguf.read_bytes()).hexdigest()
    assert result["source"]["sha256"] == {fixture_gguf.name: digest}
    assert result["plan"]["params"] == pytest.approx(134.5e6, rel=0.01)


def test_inspect_verifies_every_file(converted):
    out, _ = converted
    code, stdout, _ = run_cli("inspect", str(out))
    assert code == 0 and "files verified" in stdout


def test_bench_measures_and_check_decides(converted):
    out, _ = converted
    code, stdout, err = run_cli("bench", str(out), "--json")
    assert code == 0, err
    bench = json.loads(stdout)
    (result,) = bench["results"]
    assert result["ttft_s"] > 0 and result["prefill_tps"] > 0 and result["decode_tps"] > 0
    assert result["new_tokens"] >= 1 and result["peak_rss_gb"] > 0.1
    assert "workload cut" in bench.get("note", "") or bench["machine"]["system"] == "Darwin"

    code, stdout, _ = run_cli("check", str(out), "--target", "host", "--json")
    verdict = json.loads(stdout)
    status = {line["budget"]: line["status"] for line in verdict["lines"]}
    assert status.keys() == {"time to first token", "decode", "peak memory"}
    missed, unjudged = "missed" in status.values(), "not checked" in status.values()
    assert code == (1 if missed else 2 if unjudged else 0) and verdict["met"] == (code == 0)
    if bench["machine"]["system"] != "Darwin":  # the cut workload's 48 tokens cannot vouch for a TTFT at 512
        assert status["time to first token"] == "not checked"


@pytest.mark.parametrize("target, quant", [("host", "int4-block32"), ("snapdragon-8-gen-3", "w8a16")])
def test_onnx_artifacts_of_the_fixture_are_within_parity_bounds(target, quant, fixture_gguf, tmp_path):
    out = tmp_path / target
    code, stdout, err = run_cli("convert", str(fixture_gguf), "-t", target, "-f", "onnx", "--out", str(out), "--json")
    assert code == 0, err
    (artifact,) = json.loads(stdout)["artifacts"]
    assert (artifact["format"], artifact["quantization"]) == ("onnx", quant)
    assert artifact["parity"]["status"] == "passed", artifact["parity"]["failures"]
    code, stdout, err = run_cli(
        "bench", str(out), "--prompt-tokens", "256", "--max-tokens", "16", "--runs", "1", "--json"
    )
    assert code == 0, err
    (result,) = json.loads(stdout)["results"]
    assert result["decode_tps"] > 1 and result["new_tokens"] == 16
