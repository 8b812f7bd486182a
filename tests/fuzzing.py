"""Fuzzing every reader of untrusted files: safetensors, GGUF, CTranslate2 model.bin, config.json, manifest.json.

Each reader starts from a small valid file and gets it back mutated (bytes flipped, integers overwritten with
boundary values, cuts, insertions, splices; JSON values swapped for hostile ones), through hypothesis. A reader
passes an input when it accepts it or refuses it with an EdgeportError, within HANG_SECONDS and without running
past the memory limit. Where edgeport accepts a weights file, the library that reads it next must accept it too:
a check that passes what the library then chokes on is a finding as well.

`make fuzz` runs every reader for a time budget (`python tests/fuzzing.py --seconds 600`); each finding is shrunk
and kept under tests/fuzz_findings/<reader>/, where tests/test_fuzz.py replays it forever after.
"""

import argparse
import functools
import hashlib
import io
import json
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edgeport.errors import EdgeportError

FINDINGS = Path(__file__).parent / "fuzz_findings"
HANG_SECONDS = 10
MEMORY_LIMIT = 8 * 2**30
INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    127,
    128,
    255,
    256,
    2**15,
    2**16 - 1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**56,
    2**63,
    2**64 - 1,
]
HOSTILE_JSON = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 1e308, -1e-9, 0.5, True, False, None, "", "12", "NaN", [], {}]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-2, 2**20), max_size=4),
)


@dataclass(frozen=True)
class Reader:
    name: str
    file: str  # the name the input is written under, in a folder of its own
    seed: Callable[[Path], bytes]  # a valid input, given a folder to build it in
    run: Callable[[Path], None]  # read folder/file the way edgeport does; raise EdgeportError to refuse
    json_fields: bool = False  # mutate JSON values too


class Hang(BaseException):
    pass


class Finding(Exception):
    """An input a reader mishandled: a crash, a hang, or a file it passed that its library then refused."""


# --- seeds -------------------------------------------------------------------------------------------------------


def safetensors_seed(folder: Path) -> bytes:
    from safetensors.numpy import save

    return save(
        {
            "embed": np.arange(24, dtype=np.float16).reshape(6, 4),
            "norm": np.ones(4, dtype=np.float32),
            "ids": np.arange(3, dtype=np.int64),
            "empty": np.zeros((0, 4), dtype=np.float32),
        },
        metadata={"format": "pt"},
    )


def gguf_seed(folder: Path) -> bytes:
    import gguf

    file = folder / "seed.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_string("general.name", "seed")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    q8 = np.zeros((2, 34), dtype=np.uint8)  # two Q8_0 blocks of 32 values: fp16 scale + 32 int8
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file.read_bytes()


def ct2_seed(folder: Path, vocab: int = 64) -> bytes:
    """A tiny CTranslate2 WhisperSpec model.bin (1 + 1 layers of width 8, `vocab` tokens), in CTranslate2's
    layout."""
    d, ffn, mels, frames, tokens = 8, 16, 4, 6, 5
    rng = np.random.default_rng(0)
    variables = {
        "encoder/num_heads": np.array(2, np.int8),
        "decoder/num_heads": np.array(2, np.int8),
        "encoder/conv1/weight": rng.random((d, mels, 3), np.float32),
        "encoder/conv1/bias": np.zeros(d, np.float32),
        "encoder/conv2/weight": rng.random((d, d, 3), np.float32),
        "encoder/conv2/bias": np.zeros(d, np.float32),
        "encoder/position_encodings/encodings": rng.random((frames, d), np.float32),
        "decoder/position_encodings/encodings": rng.random((tokens, d), np.float32),
        "decoder/embeddings/weight": rng.random((vocab, d), np.float32).astype(np.float16),
    }
    for part in ("encoder", "decoder"):
        variables[f"{part}/layer_norm/gamma"] = np.ones(d, np.float32)
        variables[f"{part}/layer_norm/beta"] = np.zeros(d, np.float32)
        layer = f"{part}/layer_0"
        variables[f"{layer}/self_attention/linear_0/weight"] = rng.integers(-9, 9, (3 * d, d), dtype=np.int8)
        variables[f"{layer}/self_attention/linear_0/weight_scale"] = np.full(3 * d, 50.0, np.float32)
        variables[f"{layer}/self_attention/linear_0/bias"] = np.zeros(3 * d, np.float32)
        variables[f"{layer}/self_attention/linear_1/weight"] = rng.random((d, d), np.float32)
        variables[f"{layer}/self_attention/linear_1/bias"] = np.zeros(d, np.float32)
        for norm in ("self_attention", "ffn"):
            variables[f"{layer}/{norm}/layer_norm/gamma"] = np.ones(d, np.float32)
            variables[f"{layer}/{norm}/layer_norm/beta"] = np.zeros(d, np.float32)
        variables[f"{layer}/ffn/linear_0/weight"] = rng.random((ffn, d), np.float32)
        variables[f"{layer}/ffn/linear_0/bias"] = np.zeros(ffn, np.float32)
        variables[f"{layer}/ffn/linear_1/weight"] = rng.random((d, ffn), np.float32)
        variables[f"{layer}/ffn/linear_1/bias"] = np.zeros(d, np.float32)
    cross = "decoder/layer_0/attention"
    variables[f"{cross}/linear_0/weight"] = rng.random((d, d), np.float32)
    variables[f"{cross}/linear_0/bias"] = np.zeros(d, np.float32)
    variables[f"{cross}/linear_1/weight"] = rng.random((2 * d, d), np.float32)
    variables[f"{cross}/linear_1/bias"] = np.zeros(2 * d, np.float32)
    variables[f"{cross}/linear_2/weight"] = rng.random((d, d), np.float32)
    variables[f"{cross}/linear_2/bias"] = np.zeros(d, np.float32)
    variables[f"{cross}/layer_norm/gamma"] = np.ones(d, np.float32)
    variables[f"{cross}/layer_norm/beta"] = np.zeros(d, np.float32)
    dtype_ids = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}
    out = io.BytesIO()

    def string(text: str) -> None:
        raw = text.encode() + b"\0"
        out.write(struct.pack("<H", len(raw)) + raw)

    out.write(struct.pack("<I", 6))
    string("WhisperSpec")
    out.write(struct.pack("<II", 3, len(variables)))
    for name, value in variables.items():
        string(name)
        out.write(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
        out.write(struct.pack("<BI", dtype_ids[value.dtype.type], value.nbytes) + value.tobytes())
    out.write(struct.pack("<I", 1))
    string("decoder/projection/weight")
    string("decoder/embeddings/weight")
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [3]}))
    return out.getvalue()


def config_seed(folder: Path) -> bytes:
    return json.dumps(
        {
            "model_type": "qwen3_moe",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 384,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
        }
    ).encode()


def manifest_seed(folder: Path) -> bytes:
    from edgeport import manifest, targets
    from edgeport.plan import make_plan
    from edgeport.source import Source

    weights = folder / "mlx" / "model.safetensors"
    weights.parent.mkdir(exist_ok=True)
    weights.write_bytes(safetensors_seed(folder))
    (folder / "mlx" / "config.json").write_text("{}")  # what marks an mlx-lm folder
    source = Source(ref="seed", kind="hf-folder", config=json.loads(config_seed(folder)))
    plan = make_plan(source, targets.load("m2-air"), ["mlx"])
    artifact = {
        "format": "mlx",
        "quantization": "q4",
        "path": "mlx",
        "engine": "mlx-lm",
        "files": [
            {"path": "mlx/model.safetensors", "bytes": weights.stat().st_size, "sha256": "0" * 64},
            {"path": "mlx/config.json", "bytes": 2, "sha256": "0" * 64},
        ],
        "bytes": weights.stat().st_size,
        "details": {"shape": "cpu"},
        "parity": {
            "status": "passed",
            "method": "source: transformers; artifact: mlx-lm",
            "bounds": {"top1_agreement": 0.5},
            "metrics": {"top1_agreement": 0.9, "kl_mean": 0.1, "cosine_mean": 0.99, "ppl_source": 9.0},
            "failures": [],
            "not_checked": [],
            "seconds": 1.5,
        },
    }
    return json.dumps(
        {
            "schema_version": manifest.SCHEMA_VERSION,
            "edgeport_version": "0.1.0",
            "created": "2026-12-02T00:00:00+0000",
            "source": {"ref": "seed", "kind": "hf-folder", "model_type": "qwen3_moe", "family": "causal-lm"},
            "target": {"name": "m2-air", "ram_gb": 16.0, "description": "M2 Air"},
            "plan": plan.to_dict(),
            "artifacts": [artifact],
            "not_built": [],
            "tools": {"python": "3.11"},
        }
    ).encode()


# --- what edgeport does with each file ---------------------------------------------------------------------------


def read_safetensors(file: Path) -> None:
    from safetensors import safe_open

    from edgeport.headers import check_safetensors

    check_safetensors(file)
    library(lambda: [t.get_tensor(k) for t in [safe_open(file, "np")] for k in t.keys()])  # noqa: SIM118


def read_gguf(file: Path) -> None:
    import gguf

    from edgeport.headers import check_gguf

    check_gguf(file)
    library(lambda: [np.asarray(t.data).sum() for t in gguf.GGUFReader(file).tensors])


def read_ct2(file: Path) -> None:
    from unittest import mock

    from edgeport import ct2

    with mock.patch.object(ct2, "_tokenizer", lambda folder: StubTokenizer()):
        ct2.hf_config(file.parent)
        ct2.to_hf(file.parent, file.parent / "hf")


def read_config(file: Path) -> None:
    from rich.console import Console

    from edgeport import report
    from edgeport.plan import make_plan
    from edgeport.source import Source, read_config

    config = read_config(file.parent)
    plan = make_plan(Source(ref=str(file.parent), kind="hf-folder", config=config), _target())
    for style in report.STYLES:
        report.show(report.plan_table(plan), style, Console(file=io.StringIO(), width=80))


def read_manifest(file: Path) -> None:
    from rich.console import Console

    from edgeport import manifest, output, report
    from edgeport.cli import _pick_artifact

    found = manifest.read(file.parent)
    manifest.verify_files(found, file.parent)
    console = Console(file=io.StringIO(), width=80)
    for grid in (report.plan_table(found.plan), report.artifacts_table(found)):
        report.show(grid, "rich", console)
    report.show(report.provenance_table(found), "md", console)
    _pick_artifact(found, None, file.parent)
    output.refuse_unless_ours(file.parent)


def library(read: Callable) -> None:
    """Where edgeport's check passed a file, the library that reads it next must not refuse it."""
    try:
        read()
    except Exception as e:
        raise Finding(f"edgeport passed a file its library refuses: {type(e).__name__}: {e}") from e


@functools.cache
def _target():
    from edgeport import targets

    return targets.load("m2-air")


class StubTokenizer:
    """The tokenizer beside a CTranslate2 model is the tokenizers library's to read, not the reader's under test:
    this one answers the special tokens' ids within the seed's 64-token vocabulary."""

    def convert_tokens_to_ids(self, tokens):
        ids = {"<|endoftext|>": 60, "<|startoftranscript|>": 61, "<|translate|>": 62}
        return [ids[t] for t in tokens] if isinstance(tokens, list) else ids[tokens]

    def save_pretrained(self, folder):
        return ()


READERS = {
    r.name: r
    for r in (
        Reader("safetensors", "model.safetensors", safetensors_seed, read_safetensors, json_fields=True),
        Reader("gguf", "model.gguf", gguf_seed, read_gguf),
        Reader("ct2", "model.bin", ct2_seed, read_ct2),
        Reader("config", "config.json", config_seed, read_config, json_fields=True),
        Reader("manifest", "manifest.json", manifest_seed, read_manifest, json_fields=True),
    )
}


# --- mutations ---------------------------------------------------------------------------------------------------


@st.composite
def mutated(draw, seed: bytes, json_fields: bool) -> bytes:
    data = bytearray(seed)
    if json_fields and draw(st.booleans()):
        data = bytearray(draw(json_mutation(bytes(data))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "integer", "cut", "insert", "delete", "splice"]))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "integer":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2 ** (8 * width) - 1)) % 2 ** (8 * width)
            data[at : at + width] = value.to_bytes(width, "little")
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def json_mutation(draw, seed: bytes) -> bytes:
    """Swap, drop or add a value somewhere in the JSON (the header of a safetensors file, or the whole file)."""
    header_len = None
    if seed[:1] != b"{":  # safetensors: 8-byte length, JSON header, data
        header_len = int.from_bytes(seed[:8], "little")
        document = json.loads(seed[8 : 8 + header_len])
    else:
        document = json.loads(seed)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = _pick(draw, document)
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "drop" and isinstance(parent, dict) and key in parent:
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["__metadata__", "extra", "../x", "text_config", "shape"]))] = draw(
                HOSTILE_JSON
            )
        elif isinstance(parent, dict | list) and (isinstance(parent, dict) or key < len(parent)):
            parent[key] = draw(HOSTILE_JSON)
    text = json.dumps(document).encode()
    if header_len is None:
        return text
    return len(text).to_bytes(8, "little") + text + seed[8 + header_len :]


def _pick(draw, document):
    """A (container, key) pair somewhere in `document`, chosen by walking down at random."""
    parent, key = None, None
    node = document
    while isinstance(node, dict | list) and node and (parent is None or draw(st.booleans())):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
    return (parent, key) if parent is not None else (document, "extra")


# --- running -----------------------------------------------------------------------------------------------------


def run_one(reader: Reader, data: bytes, folder: Path, accept: bool = False) -> None:
    """Feed `data` to `reader` in a fresh copy of `folder`; raise Finding unless it is accepted or refused cleanly
    (with `accept`, unless it is accepted)."""
    import shutil

    work = folder / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(folder / "base", work)
    (work / reader.file).write_bytes(data)
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_SECONDS)
    try:
        reader.run(work / reader.file)
    except EdgeportError:
        if accept:
            raise
    except Finding:
        raise
    except Hang:
        raise Finding(f"no answer within {HANG_SECONDS} s") from None
    except (Exception, RecursionError, MemoryError) as e:
        raise Finding(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}") from e
    finally:
        signal.alarm(0)


def _hang(signum, frame):
    raise Hang


def prepare(reader: Reader, folder: Path) -> bytes:
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    seed = reader.seed(base)
    (base / reader.file).unlink(missing_ok=True)
    if reader.name == "ct2":
        (base / "tokenizer.json").write_text("{}")  # present, as in a real folder; read_ct2 reads it as a stub
    return seed


def fuzz(reader: Reader, seconds: float, examples: int = 400) -> tuple[int, list[Path]]:
    """Run `reader` for about `seconds`; the number of inputs tried and the findings saved."""
    executions, saved = 0, []
    with tempfile.TemporaryDirectory(prefix=f"edgeport-fuzz-{reader.name}-") as tmp:
        folder = Path(tmp)
        seed = prepare(reader, folder)
        run_one(reader, seed, folder, accept=True)  # the seed itself must be read
        stop = time.monotonic() + seconds
        failing: list[bytes] = []  # the inputs of this pass that a reader mishandled, in order
        while True:

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=False,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(mutated(seed, reader.json_fields))
            def once(data):
                nonlocal executions
                executions += 1
                try:
                    run_one(reader, data, folder)
                except BaseException:
                    failing.append(data)
                    raise

            failing.clear()
            try:
                once()
            except Exception as e:  # Findings, shrunk: hypothesis replays each minimal one last, then raises
                distinct = len(e.exceptions) if isinstance(e, BaseExceptionGroup) else 1
                for data, why in zip(failing[-distinct:], getattr(e, "exceptions", [e]), strict=False):
                    saved.append(save(reader, data, f"{type(why).__name__}: {why}"))
            if time.monotonic() >= stop:
                break
    return executions, saved


def save(reader: Reader, data: bytes, why: str) -> Path:
    folder = FINDINGS / reader.name
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
    file.write_bytes(data)
    print(f"finding in {reader.name}: {why.splitlines()[0][:300]} -> {file}", flush=True)
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600, help="time budget per reader")
    parser.add_argument("--readers", default=",".join(READERS), help="comma-separated: " + ", ".join(READERS))
    parser.add_argument("--json", type=Path, help="write the executions and findings per reader here")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    results = {}
    for name in args.readers.split(","):
        start = time.monotonic()
        executions, saved = fuzz(READERS[name], args.seconds)
        results[name] = {
            "seconds": round(time.monotonic() - start),
            "executions": executions,
            "findings": [str(p.relative_to(FINDINGS.parent)) for p in saved],
        }
        print(f"{name}: {executions} inputs in {results[name]['seconds']} s, {len(saved)} findings", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(1 if any(r["findings"] for r in results.values()) else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
