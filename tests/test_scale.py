"""What lets real-size models convert within the converting machine's memory: each step in a process of its own,
the source's reference outputs computed once (paged, one block of weights at a time) and stored, `--parity`."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
from conftest import LLAMA_3_1_8B, convert, make_model, make_whisper, run_cli

from edgeport import isolated, manifest
from edgeport.engines.reference import TorchRunner, TorchWhisper, paged
from edgeport.errors import MISSED, EdgeportError
from edgeport.families import FAMILIES
from edgeport.families.causal_lm import Reference
from edgeport.source import open_source

# The step process


def test_a_step_returns_its_value_and_what_it_cost():
    value, cost = isolated.run("sum", sum, [1, 2, 3])
    assert value == 6 and cost.step == "sum" and isinstance(cost.seconds, float) and cost.peak_rss_bytes > 10 * 2**20


def test_a_steps_error_comes_back_as_itself():
    with pytest.raises(EdgeportError) as raised:
        isolated.run("fail", _raise_missed, "parity failed")
    assert str(raised.value) == "parity failed" and raised.value.exit_code == MISSED
    assert any("Traceback" in note for note in raised.value.__notes__)  # the child's, for --debug


def _raise_missed(message: str):
    raise EdgeportError(message, exit_code=MISSED)


def test_a_step_killed_by_the_system_is_one_clear_line():
    with pytest.raises(EdgeportError, match=r"killed by SIGKILL \(the system's out-of-memory killer sends it\)"):
        isolated.run("convert mlx q4", signal.raise_signal, signal.SIGKILL)


def test_a_step_that_fills_the_disk_is_one_clear_line(monkeypatch):
    with pytest.raises(EdgeportError, match=r"^write ran out of disk space after \d+ s \(No space left on device\);"):
        isolated.run("write", _write_to_a_full_disk)
    with pytest.raises(OSError, match="requested and 0 written"):  # no errno, and the disk has room: not that
        isolated.run("write", _raise, OSError("1048576 requested and 0 written"))
    full = isolated.shutil.disk_usage("/")._replace(free=0)
    monkeypatch.setattr(isolated.shutil, "disk_usage", lambda path: full)  # as it is when a write found no room
    with pytest.raises(EdgeportError, match=r"ran out of disk space .* set TMPDIR to a disk with room"):
        isolated.run("write", _raise, OSError("1048576 requested and 0 written"))  # numpy's words for it


def _write_to_a_full_disk() -> None:
    with open("/dev/full", "wb") as full:
        full.write(b"x" * 2**20)


def _raise(error: BaseException):
    raise error


def test_a_stop_ends_the_step_process_too():
    """Ctrl-C (or SIGTERM, which edgeport turns into the same) while a step runs: the step's process goes as well."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell, even in a background job
    try:
        before = set(multiprocessing.active_children())
        threading.Timer(1.0, signal.pthread_kill, [threading.main_thread().ident, signal.SIGINT]).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            isolated.run("sleep", time.sleep, 60)
        assert time.monotonic() - start < 30
        assert not [child for child in multiprocessing.active_children() if child not in before]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_step_ends_when_edgeport_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) on edgeport's own process: its step stops too, and its temporary files go."""
    report, pid = tmp_path / "step", None
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import test_scale; test_scale._run_a_long_step({str(report)!r})"],
        cwd=Path(__file__).parent,
    )
    try:
        deadline = time.monotonic() + 60
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid, scratch = report.read_text().split()
        pid = int(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(pid) and not Path(scratch).exists()
    finally:
        parent.kill()
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)


def _run_a_long_step(report: str) -> None:
    isolated.run("sleep", _sleep_in_the_steps_folder, report)


def _sleep_in_the_steps_folder(report: str) -> None:
    Path(report).write_text(f"{os.getpid()} {tempfile.mkdtemp()}")
    time.sleep(120)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_steps_temporary_files_go_with_it_however_it_ends():
    """A step killed by the system cleans nothing up itself, and libraries (coremltools) leave files behind."""
    kept, _ = isolated.run("leave", _leave_a_temporary_file)
    assert not kept.exists() and kept.parent.parent.name.startswith("edgeport-step-")
    with pytest.raises(EdgeportError, match="killed by SIGKILL"):
        isolated.run("leave and die", _leave_a_temporary_file, True)
    assert not [p for p in Path(tempfile.gettempdir()).glob("edgeport-step-*") if (p / "left").exists()]


def _leave_a_temporary_file(die: bool = False) -> Path:
    folder = Path(tempfile.mkdtemp())
    (folder / "left").write_bytes(b"x" * 1024)
    if die:
        signal.raise_signal(signal.SIGKILL)
    return folder / "left"


def test_a_step_gives_back_the_blocks_it_frees():
    """A paged model's layers, read and let go as each runs, do not stay resident after they are freed."""
    held, _ = isolated.run("paging", _held_after_freeing)
    assert held < 50 * 2**20, f"{held / 2**20:.0f} MB of freed blocks held"  # 320 MB under glibc's own threshold


def _held_after_freeing() -> int:
    import psutil

    def resident() -> int:
        return psutil.Process().memory_info().rss

    np.ones(30 * 2**20, dtype=np.uint8)  # freed at once: glibc would raise its mmap threshold to this size
    before = resident()
    blocks = []
    for _ in range(16):
        blocks.append(np.ones(20 * 2**20, dtype=np.uint8))  # a layer's weights
        blocks.append(np.ones(64 * 2**10, dtype=np.uint8))  # and something small that outlives them
    del blocks[0::2]
    return resident() - before


def test_blocks_under_the_steps_threshold_are_given_back_where_asked():
    """A step keeps freed blocks under 4 MB in glibc's heap (a trace's 3.8 MB activations: 0.8 GB for Whisper
    large-v3-turbo's encoder); under `blocks_over` they go back to the system when freed."""
    held, _ = isolated.run("paging", _held_after_freeing_blocks_of, 3 * 2**20, False)
    assert held > 60 * 2**20, f"only {held / 2**20:.0f} MB held: the test no longer shows what the step keeps"
    held, _ = isolated.run("paging", _held_after_freeing_blocks_of, 3 * 2**20, True)
    assert held < 20 * 2**20, f"{held / 2**20:.0f} MB of freed blocks held"


def _held_after_freeing_blocks_of(size: int, given_back: bool) -> int:
    import contextlib

    import psutil

    from edgeport.machine import blocks_over

    before = psutil.Process().memory_info().rss
    with blocks_over(2**20) if given_back else contextlib.nullcontext():
        blocks = []
        for _ in range(32):
            blocks.append(np.ones(size, dtype=np.uint8))  # an activation
            blocks.append(np.ones(64 * 2**10, dtype=np.uint8))  # and something small that outlives it
        del blocks[0::2]
    return psutil.Process().memory_info().rss - before


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_PAGEOUT is Linux's")
def test_paging_out_checkpoints_hands_back_their_mapped_pages(tmp_path):
    """A memory-mapped safetensors file's pages, resident once read, are handed back (a later read reads the file
    again); a mapped file of another kind is left as it is."""
    import mmap

    from edgeport.machine import page_out_checkpoints

    def file_resident() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssFile:")[1].split()[0]) * 1024

    maps = {}
    for name in ("model.safetensors", "other.bin"):
        (tmp_path / name).write_bytes(np.arange(64 * 2**20, dtype=np.uint8).tobytes())
        with open(tmp_path / name, "rb") as f:
            maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    before = file_resident()
    sums = {name: int(np.frombuffer(m, dtype=np.uint8).sum(dtype=np.int64)) for name, m in maps.items()}
    assert file_resident() - before > 100 * 2**20  # both files' pages read in
    page_out_checkpoints()
    assert 50 * 2**20 < file_resident() - before < 80 * 2**20  # the checkpoint's 64 MB handed back, not the other's
    assert (
        int(np.frombuffer(maps["model.safetensors"], dtype=np.uint8).sum(dtype=np.int64)) == sums["model.safetensors"]
    )


# The paged reference


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 16}),
        ("gemma3_text", {"head_dim": 16}),
        ("phi3", {"pad_token_id": 0}),
    ],
)
def test_the_paged_reference_is_the_whole_model_to_the_bit(model_type, extra, tmp_path):
    source = open_source(str(make_model(tmp_path / "m", model_type, **extra)))
    model = paged(source, lambda block: True)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing held between blocks
    ids = list(range(3, 90))
    paged_logits = TorchRunner(source, model).logits(ids)
    assert all(p.device.type == "meta" for p in model.parameters())
    np.testing.assert_array_equal(paged_logits, TorchRunner(source, source.load_reference()).logits(ids))


@pytest.mark.parametrize("tied", [False, True])
def test_the_vocabulary_tables_are_read_a_slice_of_rows_at_a_time_to_the_bit(tied, tmp_path, monkeypatch):
    from edgeport.engines import reference

    monkeypatch.setattr(reference, "SLICE_VALUES", 7 * 64)  # 7 rows of the tiny model's tables at a time
    source = open_source(str(make_model(tmp_path / "m", "llama", tie_word_embeddings=tied)))
    reads = []

    class Counting(reference.Checkpoint):
        def read(self, name, rows=None):
            value = super().read(name, rows)
            reads.append((name, value.numel()))
            return value

    model = paged(source, lambda block: True, Counting(source.path))
    ids = list(range(3, 90))
    np.testing.assert_array_equal(
        TorchRunner(source, model).logits(ids), TorchRunner(source, source.load_reference()).logits(ids)
    )
    tables = [count for name, count in reads if "embed" in name or "lm_head" in name]
    assert len(tables) > 2 and max(tables) <= 7 * 64


def test_a_part_read_with_its_matrices_in_fp16_is_the_float32_part_rounded(tmp_path):
    """Core ML's converter reads its chunks' matrices in fp16 (not a float32 chunk first): the same fp16 weights."""
    import torch

    from edgeport.engines.reference import part_of

    source = open_source(str(make_model(tmp_path / "m", "llama", tie_word_embeddings=True)))
    half, full = part_of(source, 0, 2, matrices=torch.float16), part_of(source, 0, 2)
    pairs = list(zip(half.named_parameters(), full.named_parameters(), strict=True))
    assert any(h.dtype == torch.float16 for (_, h), _ in pairs) and any(h.dtype == torch.float32 for (_, h), _ in pairs)
    for (name, h), (_, f) in pairs:
        assert torch.equal(h, f.to(h.dtype)) and (h.dtype == torch.float16) == (h.dim() == 2), name


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("llama", True), ("gemma3_text", True)])
def test_a_slice_of_the_vocabulary_gives_its_rows_and_logits_and_zeros_for_other_tokens(model_type, tied, tmp_path):
    """The NPU shape exports a large table a slice of rows at a time: the embedding gives the slice's tokens their
    rows (scaled where the model scales them) and every other token zeros; the head gives the slice's logits; a
    part read with the rows alone computes as the whole model cut to them, which is as it was after."""
    import torch

    from edgeport.engines.reference import part_of, vocab_rows

    folder = make_model(
        tmp_path / "m", model_type, tie_word_embeddings=tied, **({"head_dim": 16} if "gemma" in model_type else {})
    )
    source = open_source(str(folder))
    whole = source.load_reference()
    ids = torch.tensor([[3, 40, 41, 90, 200, 5]])
    rows = (40, 91)
    inside = (ids >= rows[0]) & (ids < rows[1])
    with torch.no_grad():
        embedded, logits = whole.get_input_embeddings()(ids), whole(ids).logits
        hidden = whole.model(ids).last_hidden_state
        for model in (whole, part_of(source, 0, 0, embedding=True, head=False, rows=rows)):
            with vocab_rows(model, rows):
                got = model.get_input_embeddings()(ids)
            torch.testing.assert_close(got[inside], embedded[inside], rtol=0, atol=0)
            assert not got[~inside].any()
        head = part_of(source, 2, 2, embedding=False, head=True, rows=rows)
        for model in (whole, head):
            with vocab_rows(model, rows):
                sliced = model.lm_head(hidden)  # the final norm is in the hidden states
            torch.testing.assert_close(sliced, logits[..., rows[0] : rows[1]], rtol=0, atol=0)
        torch.testing.assert_close(whole.get_input_embeddings()(ids), embedded, rtol=0, atol=0)  # whole again
        assert whole.lm_head.weight.shape[0] == whole.config.vocab_size


def test_a_checkpoint_the_model_renames_on_loading_is_read_whole(tmp_path):
    """transformers fuses MoE experts when it loads them: those tensors are not the checkpoint's, so no paging."""
    source = open_source(
        str(make_model(tmp_path / "m", "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    )
    assert paged(source, lambda block: True) is None
    assert all(p.device.type == "cpu" for p in TorchRunner(source).model.parameters())


def test_whispers_encoder_layers_are_paged_and_the_rest_held(tmp_path):
    source = open_source(str(make_whisper(tmp_path / "w")))
    runner, whole = TorchWhisper(source), TorchWhisper(source, source.load_reference())
    devices = {name: p.device.type for name, p in runner.model.named_parameters()}
    assert {d for n, d in devices.items() if n.startswith("model.encoder.layers.")} == {"meta"}
    assert {d for n, d in devices.items() if not n.startswith("model.encoder.layers.")} == {"cpu"}
    assert runner.model.proj_out.weight is runner.model.model.decoder.embed_tokens.weight  # tied: held once
    mel = np.random.default_rng(0).standard_normal((1, source.config["num_mel_bins"], 3000)).astype(np.float32)
    encoded, expected = runner.encode(mel), whole.encode(mel)
    assert (encoded == expected).all()
    runner.begin(encoded)
    whole.begin(expected)
    start = [source.config["decoder_start_token_id"]]
    np.testing.assert_array_equal(runner.step(start), whole.step(start))


# The stored reference and --parity


def test_the_reference_is_stored_once_and_each_step_costed(tiny_llama, tmp_path):
    out = tmp_path / "o"
    result = convert(tiny_llama, out, "host", "-f", "mlx,gguf", "--quant", "fp16")
    reference = result["reference"]
    assert reference["level"] == "full" and "transformers" in reference["engine"]
    assert [f["path"] for f in reference["files"]] == ["reference/logits.safetensors"]
    steps = [s["step"] for s in result["steps"]]
    assert steps == ["parity reference", "convert gguf fp16", "parity gguf fp16", "convert mlx fp16", "parity mlx fp16"]
    assert all(s["peak_rss_bytes"] > 0 and s["seconds"] > 0 for s in result["steps"])
    stored = Reference.read(out / "reference")
    assert len(stored.inputs) == 3 and stored.logits[0].dtype == np.float32
    for artifact in result["artifacts"]:
        assert artifact["parity"]["metrics"]["tokens"] == sum(len(ids) for ids in stored.inputs)

    code, stdout, _ = run_cli("inspect", str(out))
    assert code == 0 and "files verified" in stdout
    (out / "reference" / "logits.safetensors").write_bytes(b"changed")
    code, stdout, _ = run_cli("inspect", str(out))
    assert code == 1 and "reference/logits.safetensors" in stdout


def test_parity_fast_checks_fewer_tokens(tiny_llama, tmp_path):
    full = convert(tiny_llama, tmp_path / "full", "host", "-f", "mlx", "--quant", "fp16")
    fast = convert(tiny_llama, tmp_path / "fast", "host", "-f", "mlx", "--quant", "fp16", "--parity", "fast")
    tokens = [r["artifacts"][0]["parity"]["metrics"]["tokens"] for r in (full, fast)]
    assert 0 < tokens[1] < tokens[0] and fast["reference"]["level"] == "fast"
    assert fast["artifacts"][0]["parity"]["status"] == "passed"


def test_parity_none_is_not_checked_and_never_passed(tiny_llama, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        "convert", str(tiny_llama), "-t", "host", "-f", "mlx", "--quant", "q4", "-o", str(out), "--parity", "none"
    )
    assert code == 0, err
    assert "not checked: skipped by --parity none" in stdout and "passed" not in stdout
    data = json.loads((out / "manifest.json").read_text())
    parity = data["artifacts"][0]["parity"]
    assert parity["status"] == "not checked" and parity["not_checked"] == ["skipped by --parity none"]
    assert data["reference"] is None and not (out / "reference").exists()
    assert [s["step"] for s in data["steps"]] == ["convert mlx q4"]
    assert manifest.read(out).reference is None


def test_aihub_needs_a_reference(tiny_llama, tmp_path):
    code, _, err = run_cli(
        "convert", str(tiny_llama), "-t", "snapdragon-8-elite", "--aihub", "--parity", "none", "-o", str(tmp_path / "o")
    )
    assert code == 3 and "--parity full or fast" in err and not (tmp_path / "o").exists()


def test_whispers_reference_is_stored_as_transcripts(tiny_whisper, tmp_path):
    out = tmp_path / "o"
    result = convert(tiny_whisper, out, "host", "-f", "ct2", "--parity", "fast", "--allow-parity-fail")
    stored = json.loads((out / "reference" / "transcripts.json").read_text())
    assert stored["level"] == "fast" and len(stored["transcripts"]) == 1
    assert result["artifacts"][0]["parity"]["metrics"]["clips"] == list(stored["transcripts"])


# The preflight and --dry-run


def test_dry_run_prints_the_plan_of_work_and_writes_nothing(tiny_llama, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = run_cli("convert", str(tiny_llama), "-t", "m2-air", "-o", str(out), "--dry-run")
    assert code == 0, err
    for step in ("parity reference", "convert mlx q4", "parity mlx q4", "convert coreml int4-block32"):
        assert step in stdout
    assert "mlx/, reference/, manifest.json" in stdout.replace("coreml/, ", "")
    assert list(tmp_path.iterdir()) == []
    code, stdout, _ = run_cli("convert", str(tiny_llama), "-t", "m2-air", "-o", str(out), "--dry-run", "--json")
    work = json.loads(stdout)["work"]
    assert [e["step"] for e in work["estimates"]][:2] == ["parity reference", "convert mlx q4"]
    assert all(e["peak_bytes"] > 0 for e in work["estimates"]) and work["left_out"] == {}


def two_format_target(tmp_path) -> str:
    """A device of the user's own: the Snapdragon 8 Elite's profile that runs MLX beside the NPU. Its NPU shape's
    conversion needs the most memory of any step, even for a tiny model."""
    from edgeport.targets import _profiles

    text = (_profiles() / "snapdragon-8-elite.toml").read_text().replace('name = "snapdragon-8-elite"', 'name = "both"')
    cpu = '  { name = "gguf", quantization = "Q4_0", unit = "cpu" },\n'
    assert cpu in text
    file = tmp_path / "both.toml"
    file.write_text(text.replace(cpu, '  { name = "mlx", quantization = "q4", unit = "gpu" },\n', 1))
    return str(file)


def room_for_all_but_onnx(model, target, tmp_path) -> str:
    """A --max-memory (GB) between what the reference and the MLX conversion need and what the NPU shape's needs."""
    code, stdout, err = run_cli("convert", str(model), "-t", target, "-o", str(tmp_path / "x"), "--dry-run", "--json")
    assert code == 0, err
    peaks = {e["step"]: e["peak_bytes"] for e in json.loads(stdout)["work"]["estimates"]}
    others = max(peaks["parity reference"], peaks["convert mlx q4"])
    assert peaks["convert onnx w4a16"] > others
    return f"{(others + peaks['convert onnx w4a16']) / 2e9:.4f}"


def test_a_format_asked_for_that_does_not_fit_here_is_refused_before_any_work(tiny_llama, tmp_path):
    target = two_format_target(tmp_path)
    out, limit = tmp_path / "o", room_for_all_but_onnx(tiny_llama, target, tmp_path)
    code, _, err = run_cli(
        "convert", str(tiny_llama), "-t", target, "-f", "mlx,onnx", "-o", str(out), "--max-memory", limit
    )
    assert code == 3 and "onnx: needs about" in err and "GB are available" in err
    assert "mlx fits (-f mlx)" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "both.toml"]


def test_a_format_not_asked_for_that_does_not_fit_is_left_out(tiny_llama, tmp_path):
    target = two_format_target(tmp_path)
    limit = room_for_all_but_onnx(tiny_llama, target, tmp_path)
    code, stdout, err = run_cli(
        "convert", str(tiny_llama), "-t", target, "-o", str(tmp_path / "o"), "--max-memory", limit, "--json"
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert [a["format"] for a in result["artifacts"]] == ["mlx"]
    (left_out,) = result["not_built"]
    assert left_out["format"] == "onnx" and "of memory here" in left_out["reason"]
    predicted = {e["step"]: e["peak_bytes"] for e in result["preflight"]}
    assert {s["step"] for s in result["steps"]} <= set(predicted)


def test_no_room_for_the_reference_says_to_skip_it(tiny_llama, tmp_path):
    code, _, err = run_cli("convert", str(tiny_llama), "-t", "host", "-o", str(tmp_path / "o"), "--max-memory", "0.1")
    assert code == 3 and "parity reference needs about" in err and "--parity none" in err


def test_a_hub_model_is_downloaded_only_once_the_preflight_passes(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(tiny_llama / "config.json"))

    def snapshot_download(*args, **kwargs):
        raise AssertionError("the weights were asked for")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    code, _, err = run_cli("convert", "org/model", "-t", "m2-air", "-o", str(tmp_path / "o"), "--dry-run")
    assert code == 0, err
    code, _, err = run_cli("convert", "org/model", "-t", "m2-air", "-o", str(tmp_path / "o"), "--max-memory", "0.3")
    assert code == 3 and "needs about" in err and not (tmp_path / "o").exists()


def test_no_disk_for_a_hub_models_weights_is_said_before_they_are_fetched(tiny_llama, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    import huggingface_hub.constants

    snapshot, hub_cache = tmp_path / "snapshot", tmp_path / "hub"
    snapshot.mkdir()
    hub_cache.mkdir()
    shutil.copy(tiny_llama / "config.json", snapshot)  # the config fetched, the weights not yet
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(snapshot / "config.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))

    def snapshot_download(*args, **kwargs):
        raise AssertionError("the weights were asked for")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    usage = shutil.disk_usage
    full = lambda path: usage(path)._replace(free=1000) if str(path).startswith(str(hub_cache)) else usage(path)  # noqa: E731
    monkeypatch.setattr(shutil, "disk_usage", full)
    code, _, err = run_cli("convert", "org/model", "-t", "m2-air", "-o", str(tmp_path / "elsewhere" / "o"))
    assert code == 3 and "org/model: downloading it needs about" in err and f"of disk in {hub_cache}" in err
    assert "HF_HUB_CACHE" in err and not (tmp_path / "elsewhere" / "o").exists()


def test_a_gguf_sources_float16_copy_needs_room_in_the_cache(fixture_gguf, tmp_path, monkeypatch):
    from edgeport import preflight
    from edgeport.plan import make_plan
    from edgeport.targets import load

    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path / "cache"))  # no copy made yet
    source = open_source(str(fixture_gguf), config_only=True)
    assert source.fills_cache == tmp_path / "cache"
    target = load("m2-air")
    plan = make_plan(source, target, ["mlx"], None)
    copy = 2 * source.family.size(source.config).params
    for free, refused in ((copy - 1, True), (copy + 1, False)):
        room = preflight.Room(10**12, 10**12, 10**12, cache_disk_bytes=free)
        if refused:
            with pytest.raises(EdgeportError, match=r"its float16 copy needs about .* EDGEPORT_CACHE"):
                preflight.plan_work(source, target, plan, [], "none", room, asked=False)
        else:
            preflight.plan_work(source, target, plan, [], "none", room, asked=False)


def test_outputs_and_temporary_files_on_one_disk_need_room_together(tiny_llama, tmp_path):
    """Each fits alone; on one file system the largest step's scratch comes on top of every artifact written."""
    from edgeport import preflight
    from edgeport.plan import make_plan
    from edgeport.targets import load

    source = open_source(str(tiny_llama), config_only=True)
    target = load("m2-air")
    plan = make_plan(source, target, ["mlx", "coreml"], None)
    work = preflight.estimate(preflight.model_of(source, 4096, target), plan.steps, "full")
    writes, temporary = sum(e.writes_bytes for e in work), max(e.temporary_bytes for e in work)
    assert writes and temporary
    for free, one_disk, refused in (
        (writes + temporary - 1, True, True),
        (writes + temporary - 1, False, False),
        (writes + temporary, True, False),
    ):
        room = preflight.Room(10**12, free, free, one_disk=one_disk)
        if refused:
            with pytest.raises(EdgeportError, match=r"need about .* of disk together, .* set TMPDIR to another disk"):
                preflight.fitting(work, room, asked=False)
        else:
            preflight.fitting(work, room, asked=False)
    assert preflight.Room.here(tmp_path).one_disk == (
        tmp_path.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev
    )


def test_the_estimates_follow_the_models_shape(tmp_path):
    """The reference reads one block at a time where it can: its estimate grows with the largest block, not the
    model; a checkpoint that cannot be paged (fused MoE experts) is estimated whole."""
    from edgeport import preflight
    from edgeport.plan import make_plan
    from edgeport.targets import load

    def reference_peak(folder):
        source = open_source(str(folder), config_only=True)
        target = load("host")
        plan = make_plan(source, target, ["mlx"])
        model = preflight.model_of(source, plan.context_length, target)
        (reference, *_) = preflight.estimate(model, plan.steps, "full")
        return model, reference.peak_bytes

    dense, dense_peak = reference_peak(make_model(tmp_path / "dense", "llama", num_hidden_layers=8))
    deep, deep_peak = reference_peak(make_model(tmp_path / "deep", "llama", num_hidden_layers=16))
    assert dense.pageable and deep.params > dense.params and deep_peak == dense_peak
    moe, moe_peak = reference_peak(
        make_model(tmp_path / "moe", "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    )
    assert not moe.pageable and moe_peak > preflight.REFERENCE_WHOLE.base_gb * 1e9 + 4 * moe.params - 1


def test_core_ml_and_the_npu_shape_are_estimated_by_their_largest_part():
    """Core ML converts a part of at most PART_PARAMS at a time, the NPU shape a unit of at most UNIT_PARAMS (or a
    layer alone, the vocabulary's tables in slices of rows): a model twice as deep with the same largest part costs
    them what it costs the reference to read, not twice the memory."""
    from edgeport import preflight
    from edgeport.families.causal_lm import PART_PARAMS
    from edgeport.targets import load

    family, target = FAMILIES["causal-lm"], load("snapdragon-8-elite")
    footprint = family.footprint(LLAMA_3_1_8B, 4096, target)
    # the last part: a layer, the output projection and the final norm; the largest unit: a layer alone
    largest = 218_112_000 + 128256 * 4096 + 4096
    assert footprint.part_params == max(s.params for s in family.parts(LLAMA_3_1_8B, PART_PARAMS)) == largest
    assert footprint.unit_params == 218_112_000

    def model_of(config, cache: bool) -> preflight.Model:
        size, footprint = family.size(config), family.footprint(config, 4096, target)
        return preflight.Model(
            "causal-lm",
            size.params,
            2 * size.params,
            footprint.block_params,
            footprint.paged_params,
            128256,
            True,
            footprint.cache_bytes if cache else 0,
            footprint.part_params,
            footprint.unit_params,
            footprint.npu_part_params,
        )

    def converting(config, rate):
        return preflight._cost("convert", rate, model_of(config, cache=False), 0).peak_bytes

    deeper = {**LLAMA_3_1_8B, "num_hidden_layers": 64}
    for rate in (preflight.CONVERT["causal-lm", "coreml", "gpu"], preflight.CONVERT["causal-lm", "onnx", "npu"]):
        assert converting(deeper, rate) == converting(LLAMA_3_1_8B, rate)
    assert converting(LLAMA_3_1_8B, preflight.CONVERT["causal-lm", "coreml", "gpu"]) < 16e9  # the bf16 weights

    def scratch(config, rate):  # the temporary disk: a part's graphs and calibration inputs, written a part at a time
        return preflight._cost("convert", rate, model_of(config, cache=True), 0).temporary_bytes

    for rate in (preflight.CONVERT["causal-lm", "coreml", "npu"], preflight.CONVERT["causal-lm", "onnx", "npu"]):
        assert 0 < scratch(deeper, rate) < 1.1 * scratch(LLAMA_3_1_8B, rate) < 16e9


def test_the_npu_shapes_parity_is_estimated_by_its_largest_part_as_built():
    """Its parity runs one part of the artifact at a time: the part the converter built for the target and the
    quantization (4-bit layers make a part of the same bytes hold more of them), not a fixed span."""
    from edgeport import preflight
    from edgeport.convert.onnx import npu_layout
    from edgeport.quantization import get
    from edgeport.targets import load

    family, target = FAMILIES["causal-lm"], load("snapdragon-8-elite")
    footprint = family.footprint(LLAMA_3_1_8B, 4096, target)
    for name in ("w8a16", "w4a16"):
        spans = family.npu_parts(LLAMA_3_1_8B, target, get(name, "onnx"))
        assert footprint.npu_part_params[name] == max(span.params for span in spans)
        source = SimpleNamespace(family=family, config=LLAMA_3_1_8B)
        assert len(npu_layout(source, get(name, "onnx"), target).parts) == len(spans)
    model = preflight.Model(
        "causal-lm", 8_030_261_248, 16 * 10**9, 0, 0, 128256, True, 0, 0, 0, footprint.npu_part_params
    )

    def parity_peak(name: str) -> int:
        step = SimpleNamespace(format="onnx", quantization=name, unit="npu", weight_bytes=0)
        (parity,) = [e for e in preflight.estimate(model, [step], "full") if e.parity]
        return parity.peak_bytes

    rate = preflight.PARITY["causal-lm", "onnx", "npu"]
    for name in ("w8a16", "w4a16"):
        assert parity_peak(name) == int(rate.base_gb * 1e9 + rate.per_npu_part_param * footprint.npu_part_params[name])
    assert parity_peak("w8a16") < parity_peak("w4a16") < 8e9
