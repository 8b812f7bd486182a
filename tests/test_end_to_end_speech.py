"""The real speech fixture (Whisper tiny.en as CTranslate2 fp16) through convert, bench and check, on the reading
of A Tale of Two Cities and the Beckett quote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import convert, package_path, run_cli

from edgeport.audio import parity_clips
from edgeport.parity import BOUNDS, wer

pytestmark = pytest.mark.slow


def assert_transcribes_like_the_source(artifact):
    parity = artifact["parity"]
    metrics = parity["metrics"]
    assert parity["status"] == "passed", parity["failures"]
    assert metrics["wer_source"] == 0  # tiny.en gets every word of both clips right
    assert metrics["wer_artifact"] <= metrics["wer_source"] + BOUNDS[artifact["quantization"]].wer_delta


@pytest.fixture(scope="module")
def host_output(fixture_whisper, tmp_path_factory):
    out = tmp_path_factory.mktemp("speech") / "tiny-en-host"
    return out, convert(fixture_whisper, out, "host")


def test_host_ctranslate2_and_onnx_transcribe_like_the_source(host_output, fixture_whisper):
    _, result = host_output
    assert [(a["format"], a["quantization"]) for a in result["artifacts"]] == [("ct2", "int8"), ("onnx", "int8")]
    for artifact in result["artifacts"]:
        assert_transcribes_like_the_source(artifact)
    assert result["source"]["kind"] == "ct2" and "model.bin" in result["source"]["sha256"]
    assert result["plan"]["params"] == pytest.approx(37.76e6, rel=0.01)


@pytest.mark.parametrize("fmt", ["ct2", "onnx"])
def test_bench_and_check_on_the_reading(fmt, host_output):
    out, _ = host_output
    code, stdout, err = run_cli("bench", str(out), "-f", fmt, "--runs", "1", "--json")
    assert code == 0, err
    (result,) = json.loads(stdout)["results"]
    assert result["audio_s"] == pytest.approx(44.4, abs=0.1) and result["windows"] == 2
    assert result["wer"] == 0 and result["tokens"] > 100
    code, stdout, _ = run_cli("check", str(out), "--target", "host", "--json")
    verdict = json.loads(stdout)
    assert code == (0 if verdict["met"] else 1)
    assert {line["budget"] for line in verdict["lines"]} == {"real-time factor", "WER", "peak memory"}


def test_m2_air_core_ml_and_mlx_transcribe_like_the_source(fixture_whisper, tmp_path):
    result = convert(fixture_whisper, tmp_path / "m2-air", "m2-air")
    assert [(a["format"], a["quantization"]) for a in result["artifacts"]] == [("coreml", "fp16"), ("mlx", "fp16")]
    for artifact in result["artifacts"]:
        assert_transcribes_like_the_source(artifact)


def test_snapdragon_static_qdq_graphs_transcribe_like_the_source(fixture_whisper, tmp_path):
    result = convert(fixture_whisper, tmp_path / "snapdragon", "snapdragon-8-gen-3")
    (artifact,) = result["artifacts"]
    assert (artifact["quantization"], artifact["details"]["shape"]) == ("w8a16", "npu")
    assert_transcribes_like_the_source(artifact)
    # and the app-side example, on the CPU EP here, gets every word of the Beckett quote
    example = Path(__file__).parents[1] / "examples" / "windows-on-snapdragon" / "transcribe.py"
    audio = package_path("moonshine_voice", "assets/beckett.wav")
    command = [sys.executable, str(example), str(tmp_path / "snapdragon" / "onnx"), str(audio)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert wer(parity_clips()[1].reference, done.stdout) == 0
