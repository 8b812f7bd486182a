"""What a user sees: one clear line, a non-zero exit, no traceback, nothing half-written."""

import io
import json
import shutil

import pytest
import torch
from conftest import mlx_fp16_output, run_cli
from safetensors.torch import load_file


def assert_one_line_error(code, out, err, *fragments):
    assert code != 0
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_path(tmp_path):
    code, out, err = run_cli("convert", str(tmp_path / "nope"), "-t", "m2-air", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "no such file or folder")
    assert not (tmp_path / "o").exists()


def test_unknown_target(tiny_llama):
    code, out, err = run_cli("plan", str(tiny_llama), "-t", "m2-ari")
    assert_one_line_error(code, out, err, "unknown target 'm2-ari'", "did you mean 'm2-air'")


def test_unknown_architecture(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    code, out, err = run_cli("convert", str(folder), "-t", "host", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "architecture 'mamba' is not supported")
    assert not (tmp_path / "o").exists()


def test_pickle_only_checkpoint(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    code, out, err = run_cli("convert", str(folder), "-t", "host", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "--allow-pickle")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, out, err = run_cli("convert", str(folder), "-t", "host", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "truncated or corrupt")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tiny_llama, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    code, out, err = run_cli("convert", str(tiny_llama), "-t", "host", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "already exists", "--force")
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file or folder"):
        run_cli("--debug", "plan", str(tmp_path / "nope"), "-t", "m2-air")


def test_inspect_and_bench_on_a_folder_that_is_not_an_output(tmp_path):
    code, out, err = run_cli("inspect", str(tmp_path))
    assert_one_line_error(code, out, err, "no manifest.json")
    code, out, err = run_cli("bench", str(tmp_path))
    assert_one_line_error(code, out, err, "no manifest.json")


def test_targets_and_plan_print_json(tiny_llama):
    code, out, _ = run_cli("targets", "--json")
    assert code == 0 and "m2-air" in {t["name"] for t in json.loads(out)}
    code, out, _ = run_cli("plan", str(tiny_llama), "-t", "m2-air", "--ram", "8", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["ram_gb"] == 8 and [s["format"] for s in plan["steps"]] == ["mlx", "coreml", "gguf"]


def test_bad_bench_options(fp16_output):
    out = fp16_output
    code, stdout, err = run_cli("bench", str(out), "--prompt-tokens", "lots")
    assert_one_line_error(code, stdout, err, "--prompt-tokens lots: expected positive numbers")
    empty = out.parent / "empty.txt"
    empty.write_text("  \n")
    code, stdout, err = run_cli("bench", str(out), "--text", str(empty), "--prompt-tokens", "96")
    assert_one_line_error(code, stdout, err, "the text to summarize is empty")
    code, _, err = run_cli("bench", str(out), "--runs", "0")
    assert code == 3 and "Invalid value for '--runs'" in err


def test_check_before_any_bench(fp16_output):
    code, stdout, err = run_cli("check", str(fp16_output), "-t", "host")
    assert_one_line_error(code, stdout, err, "no bench.json", "run `edgeport bench")


@pytest.fixture(scope="module")
def fp16_output(tiny_llama, tmp_path_factory):
    return mlx_fp16_output(tiny_llama, tmp_path_factory.mktemp("o") / "fp16")


def test_bench_measures_exactly_the_lengths_asked_and_check_judges_that_row(fp16_output):
    code, stdout, err = run_cli(
        "bench", str(fp16_output), "-f", "mlx", "--prompt-tokens", "61,80", "--max-tokens", "2", "--runs", "1", "--json"
    )
    assert code == 0, err
    assert [r["prompt_tokens"] for r in json.loads(stdout)["results"]] == [61, 80]


def test_bench_cuts_prompts_to_the_models_context_and_says_so(fp16_output):
    code, stdout, err = run_cli(
        "bench", str(fp16_output), "--prompt-tokens", "700", "--max-tokens", "2", "--runs", "1", "--json"
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert [r["prompt_tokens"] for r in result["results"]] == [510]  # the tiny model's context is 512
    assert "the model's context holds 512" in result["note"]


def test_check_json_gives_numbers_and_units(fp16_output):
    run_cli("bench", str(fp16_output), "--prompt-tokens", "32", "--max-tokens", "2", "--runs", "1")
    code, stdout, _ = run_cli("check", str(fp16_output), "-t", "host", "--json")
    lines = {line["budget"]: line for line in json.loads(stdout)["lines"]}
    peak = lines["peak memory"]
    assert isinstance(peak["limit"], float) and peak["unit"] == "GB" and isinstance(peak["measured"], float)
    assert lines["time to first token"]["measured"] is None and code == 2  # 32 tokens cannot vouch for 512


@pytest.mark.slow
def test_libraries_stay_quiet_unless_verbose(fixture_gguf, tmp_path):
    """A user sees edgeport's own progress lines, not the libraries' bars, warnings and log lines: the GGUF
    fixture's dequantization is the loudest path transformers has. Each run stops right after that loud step (host
    names no AI Hub device, which the build checks first), in a cache of its own."""
    import os
    import subprocess
    import sys

    from edgeport.quiet import ENVIRONMENT

    def opening(name, *extra):
        env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}  # as a user's shell has it
        env["EDGEPORT_CACHE"] = str(tmp_path / f"cache-{name}")
        command = [
            sys.executable,
            "-m",
            "edgeport",
            "convert",
            str(fixture_gguf),
            "-t",
            "host",
            "-f",
            "onnx",
            "--aihub",
        ]
        done = subprocess.run(
            [*command, "--out", str(tmp_path / name), *extra], capture_output=True, text=True, env=env
        )
        assert done.returncode == 3 and "names no Qualcomm AI Hub device" in done.stderr, done.stderr
        return [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]

    lines = opening("quiet")
    own = [line for line in lines if line.startswith(("measuring this machine", "warning:"))]  # edgeport's words
    quiet = [line for line in lines if line not in own]
    assert any("losses add to the source's" in line for line in own), own  # the Q4_1 source
    assert quiet[0].startswith("✓ Opening") and quiet[1:] == [quiet[-1]] and quiet[-1].startswith("error:"), quiet
    loud = opening("loud", "--verbose")  # after the subcommand
    assert any("de-quantizing GGUF tensors" in line for line in loud)


def test_plan_needs_none_of_the_converting_libraries(tiny_llama):
    """`pip install edgeport` alone plans: transformers reads the config, and torch, gguf and the rest come with the
    extras that convert (here made unimportable, as on a machine without them)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for name in ('torch', 'gguf', 'accelerate', 'jinja2', 'mlx', 'coremltools', 'onnxruntime'):\n"
        "    sys.modules[name] = None\n"
        "sys.argv = ['edgeport', 'plan', sys.argv[1], '-t', 'm2-air']\n"
        "from edgeport.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_llama)], capture_output=True, text=True)
    assert done.returncode == 0 and "meets the whole budget of m2-air" in done.stdout, done.stdout[-300:] + done.stderr


def test_bench_speaks_llama_bench(fp16_output):
    """-p, -n, -r as llama-bench and mlx_lm.benchmark have them; -o md|csv|json; mean ± std beside the median."""
    code, stdout, err = run_cli("bench", str(fp16_output), "-p", "64", "-n", "3", "-r", "2", "-o", "csv")
    assert code == 0, err
    header, row = stdout.strip().splitlines()
    assert header.startswith("prompt,new,TTFT s,prefill tok/s,decode tok/s") and row.startswith("64,3,")
    assert "±" in row  # two runs: their spread beside the median
    code, stdout, _ = run_cli("bench", str(fp16_output), "-p", "64", "-n", "3", "-r", "1", "-o", "md")
    assert "| prompt | new | TTFT s |" in stdout and "|---|" in stdout
    code, stdout, _ = run_cli("bench", str(fp16_output), "-p", "64", "-n", "3", "-r", "2", "-o", "json")
    (result,) = json.loads(stdout)["results"]
    mean, std = result["decode_tps_mean_std"]
    assert mean > 0 and std >= 0


def test_every_table_reads_at_80_columns(fp16_output):
    """No cell cut to "…", no line past 80 columns, ids whole, in box drawing; a plain markdown table in a pipe."""
    from rich.console import Console

    from edgeport import manifest, report, targets

    found = manifest.read(fp16_output)
    grids = [
        report.targets_table([targets.load(name) for name in targets.names()]),
        report.plan_table(found.plan),
        report.artifacts_table(found),
        report.provenance_table(found),
    ]
    for grid in grids:
        console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
        report.show(grid, "rich", console)
        text = console.file.getvalue()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
        for row in grid.rows:
            assert all(cell in text for cell in row[: grid.ids]), (row, text)
    code, stdout, _ = run_cli("plan", str(fp16_output / "mlx"), "-t", "snapdragon-8-elite")
    assert code == 0 and "| format | quant |" in stdout and "┃" not in stdout and "tiny-llama" not in stdout
