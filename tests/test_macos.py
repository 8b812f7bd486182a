"""What only a Mac can show: Core ML prediction, MLX on Metal, the bench on Apple Silicon. These run in the macOS
workflow (.github/workflows/macos.yml) and skip elsewhere, where the same artifacts are checked by their weights."""

import json
import sys

import pytest
from conftest import convert, run_cli

pytestmark = [
    pytest.mark.macos,
    pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS on Apple Silicon"),
]


@pytest.fixture(scope="module")
def mac_output(tiny_llama, tmp_path_factory):
    return convert(tiny_llama, tmp_path_factory.mktemp("mac") / "o", "m2-air", "--allow-parity-fail")


def test_core_ml_predicts_and_passes_parity_on_a_mac(mac_output):
    (coreml,) = [a for a in mac_output["artifacts"] if a["format"] == "coreml"]
    assert coreml["parity"]["status"] == "passed" and not coreml["parity"]["not_checked"]
    assert "Core ML" in coreml["parity"]["method"]


def test_mlx_runs_its_quantized_kernels_on_metal(mac_output):
    import mlx.core as mx

    assert mx.default_device() == mx.gpu
    (mlx,) = [a for a in mac_output["artifacts"] if a["format"] == "mlx"]
    assert mlx["parity"]["status"] == "passed" and not mlx["parity"]["not_checked"]


@pytest.mark.parametrize("fmt", ["mlx", "coreml"])
def test_bench_and_check_on_apple_silicon(fmt, tiny_llama, tmp_path):
    out = tmp_path / fmt
    convert(tiny_llama, out, "m2-air", "-f", fmt, "--allow-parity-fail")
    code, stdout, err = run_cli("bench", str(out), "-f", fmt, "--prompt-tokens", "128", "--max-tokens", "16", "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)["results"]
    assert row["prompt_tokens"] == 128 and row["decode_tps"] > 0 and "note" not in json.loads(stdout)
