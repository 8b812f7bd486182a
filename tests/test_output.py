"""The user's files are safe: an output never touches the source or a folder edgeport did not write, two runs never
share a destination, and a run stopped by any signal at any stage leaves the destination as it was."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import convert, run_cli
from test_cli import assert_one_line_error

from edgeport import output


def snapshot(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name or ".lock" in p.name)


@pytest.fixture
def model(tiny_llama, tmp_path):
    """A copy of the tiny model with a file of the user's beside it."""
    folder = shutil.copytree(tiny_llama, tmp_path / "models" / "m")
    (tmp_path / "models" / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize(
    "out",
    ["models/m", "models", ".", "models/m/out"],
    ids=["the-source", "the-source's-parent", "an-ancestor", "inside-the-source"],
)
def test_output_never_touches_the_source(model, tmp_path, out):
    before = snapshot(tmp_path)
    code, stdout, err = run_cli(
        "convert", str(model), "-t", "host", "-f", "mlx", "--out", str(tmp_path / out), "--force"
    )
    assert_one_line_error(code, stdout, err, "the source")
    assert snapshot(tmp_path) == before
    assert leftovers(tmp_path / "models") == []


def test_a_gguf_source_file_is_protected_too(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF")
    code, stdout, err = run_cli("convert", str(weights), "-t", "host", "--out", str(weights), "--force")
    assert_one_line_error(code, stdout, err, "holds the source")
    assert weights.read_bytes() == b"GGUF"


def test_force_replaces_only_folders_edgeport_wrote(model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--out", str(mine), "--force")
    assert_one_line_error(code, stdout, err, "no manifest.json", "edgeport did not write it")
    assert (mine / "thesis.tex").read_text() == "years of work"

    file = tmp_path / "report.pdf"
    file.write_text("a file")
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--out", str(file), "--force")
    assert_one_line_error(code, stdout, err, "is a file")
    assert file.read_text() == "a file" and leftovers(tmp_path) == []


def test_force_refuses_an_output_holding_files_of_the_users(model, tmp_path):
    out = tmp_path / "o"
    convert(model, out, "host", "-f", "mlx", "--quant", "fp16")
    (out / "mlx" / "my-notes.md").write_text("keep")
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--out", str(out), "--force")
    assert_one_line_error(code, stdout, err, "1 file(s) edgeport did not write", "mlx/my-notes.md")
    assert (out / "mlx" / "my-notes.md").read_text() == "keep"

    (out / "mlx" / "my-notes.md").unlink()
    (out / "bench.json").write_text("{}")  # edgeport's own, written by `edgeport bench`
    before = (out / "manifest.json").read_text()
    convert(model, out, "host", "-f", "mlx", "--quant", "fp16", "--force")
    assert (out / "manifest.json").read_text() != before and not (out / "bench.json").exists()
    assert leftovers(tmp_path) == []


def test_a_symlinked_output_is_refused(model, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "--out", str(tmp_path / "link"), "--force")
    assert_one_line_error(code, stdout, err, "symbolic link")


def test_a_second_run_cannot_enter_a_claimed_destination(model, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(InterruptedError), output.claim(out, force=False):
        code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--out", str(out))
        assert_one_line_error(code, stdout, err, f"another edgeport run (pid {os.getpid()}) is writing it")
        raise InterruptedError  # the first run stops: nothing of either lands
    assert not out.exists() and leftovers(tmp_path) == []


def test_stale_staging_of_a_dead_run_is_cleaned_up(model, tmp_path):
    out = tmp_path / "o"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.staging-{dead.stdout.strip()}"
    (stale / "mlx").mkdir(parents=True)
    (stale / "mlx" / "weights.safetensors").write_bytes(b"half")
    convert(model, out, "host", "-f", "mlx", "--quant", "fp16")
    assert leftovers(tmp_path) == [] and (out / "manifest.json").is_file()


def test_a_relative_output_and_source(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    convert("models/m", "rel/o", "host", "-f", "mlx", "--quant", "fp16")
    assert (tmp_path / "rel" / "o" / "manifest.json").is_file()


def edgeport_process(*args, cwd):
    """edgeport as a user's shell starts it, where Ctrl-C works even if this suite runs as a background job (whose
    SIGINT the shell ignores, and every process it starts inherits that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "edgeport", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, what, process, timeout=180):
    start = time.monotonic()
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"edgeport ended before {what}: {process.stderr.read()}")
        if time.monotonic() - start > timeout:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def builder_children(pid):
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "onnx_builder" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_while_the_builder_runs_leaves_nothing(model, tmp_path, stop):
    """The ONNX CPU shape runs onnxruntime-genai's builder as a child process: it goes with us."""
    out = tmp_path / "o"
    run = edgeport_process("convert", str(model), "-t", "host", "-f", "onnx", "--out", str(out), cwd=tmp_path)
    wait_for(lambda: builder_children(run.pid), "the builder started", run)
    children = builder_children(run.pid)
    run.send_signal(stop)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + stop, err
    assert f"interrupted ({stop.name})" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"builder processes outlived edgeport: {alive}"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_during_a_forced_replace_keeps_the_old_output(model, tmp_path, stop):
    """Stopped while the ONNX builder works on the replacement (a stage that lasts seconds, so the signal surely
    lands in it), the old output stays byte for byte."""
    out = tmp_path / "o"
    convert(model, out, "host", "-f", "mlx", "--quant", "fp16")
    before = snapshot(out)
    run = edgeport_process(
        "convert", str(model), "-t", "host", "-f", "onnx", "--out", str(out), "--force", cwd=tmp_path
    )
    wait_for(lambda: builder_children(run.pid), "the builder started", run)
    run.send_signal(stop)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + stop, err
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KB file system: too small for any output."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("fmt", ["mlx", "onnx"])
def test_a_full_disk_is_named_and_leaves_nothing(model, small_disk, fmt):
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", fmt, "--out", str(small_disk / "o"))
    assert_one_line_error(code, stdout, err, f"the disk holding {small_disk} is full", "free some space")
    assert list(small_disk.iterdir()) == []
