"""Hostile and broken inputs, one kind a row, through the CLI as a user meets them: each gets one line naming the
file and the problem, a non-zero exit, no traceback, no output folder, and runs no code it carries.

(The output folder's own safety, signals and the full disk are in test_output.py; the readers' fuzzing in
test_fuzz.py; the AI Hub token in test_aihub.py.)
"""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import mlx_fp16_output, run_cli
from fuzzing import ct2_seed, gguf_seed
from test_cli import assert_one_line_error

MARKER = "edgeport-payload-ran"


def plan_error(folder, *fragments, target="m2-air"):
    code, out, err = run_cli("plan", str(folder), "-t", target)
    assert_one_line_error(code, out, err, *fragments)


def convert_error(model, tmp_path, *fragments, extra=()):
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--out", str(out), *extra)
    assert_one_line_error(code, stdout, err, *fragments)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# --- config.json -------------------------------------------------------------------------------------------------

CONFIGS = {  # id: (change to the tiny model's config, words the error must carry)
    "size-as-string": ({"hidden_size": "64"}, "hidden_size must be a whole number"),
    "size-negative": ({"hidden_size": -64}, "hidden_size must be a whole number"),
    "size-zero": ({"num_attention_heads": 0}, "num_attention_heads must be a whole number"),
    "size-bool": ({"hidden_size": True}, "hidden_size must be a whole number"),
    "size-fraction": ({"intermediate_size": 1.5}, "intermediate_size must be a whole number"),
    "layers-1e12": ({"num_hidden_layers": 10**12}, "num_hidden_layers must be a whole number from 1 to 4,096"),
    "vocab-huge": ({"vocab_size": 2**40}, "vocab_size must be a whole number"),
    "size-null": ({"hidden_size": None}, "lacks hidden_size"),
    "size-missing": ({"num_attention_heads": "__drop__"}, "lacks num_attention_heads"),
    "model-type-missing": ({"model_type": "__drop__"}, "has no model_type"),
    "model-type-number": ({"model_type": 42}, "has no model_type"),
    "architecture-unknown": ({"model_type": "mamba"}, "architecture 'mamba' is not supported"),
    "heads-not-dividing": (
        {"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": "__drop__"},
        "hidden_size 64 is not a multiple of num_attention_heads 3",
    ),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple"),
    "experts-without-routing": ({"num_local_experts": 8}, "needs num_experts_per_tok"),
    "routing-past-experts": ({"num_local_experts": 2, "num_experts_per_tok": 4}, "exceeds the 2 experts"),
    "token-id-past-vocab": ({"eos_token_id": 10**6}, "eos_token_id must be token ids below vocab_size"),
    "token-id-string": ({"bos_token_id": "1"}, "bos_token_id must be token ids"),
    "rope-theta-negative": ({"rope_theta": -1.0}, "rope_theta must be a number above 0"),
    "norm-eps-zero": ({"rms_norm_eps": 0}, "rms_norm_eps must be a number above 0"),
    "text-config-string": ({"text_config": "x"}, "text_config must be an object"),
    "text-config-bad-size": ({"text_config": {"hidden_size": -1}}, "hidden_size must be a whole number"),
}
RAW_CONFIGS = {  # id: (bytes of config.json, words the error must carry)
    "nan-literal": (b'{"model_type": "llama", "hidden_size": NaN}', "NaN is not a number JSON allows"),
    "infinity-literal": (b'{"model_type": "llama", "vocab_size": Infinity}', "is not a number JSON allows"),
    "float-overflow": (b'{"model_type": "llama", "rope_theta": 1e400}', "is too large"),
    "duplicate-key": (b'{"model_type": "llama", "model_type": "mamba"}', "is given twice"),
    "not-json": (b"model_type = llama", "is not valid JSON"),
    "not-utf8": (b'{"model_type": "\xff\xfe"}', "is not valid JSON"),
    "a-list": (b"[1, 2, 3]", "expected a JSON object"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    "empty": (b"", "is not valid JSON"),
}


@pytest.fixture(scope="module")
def base_config(tiny_llama):
    return json.loads((tiny_llama / "config.json").read_text())


@pytest.mark.parametrize("case", CONFIGS)
def test_config_values(case, base_config, tmp_path):
    change, fragment = CONFIGS[case]
    config = {**base_config, **change}
    config = {k: v for k, v in config.items() if v != "__drop__"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan_error(tmp_path, "config.json", fragment)


@pytest.mark.parametrize("case", RAW_CONFIGS)
def test_config_bytes(case, tmp_path):
    raw, fragment = RAW_CONFIGS[case]
    (tmp_path / "config.json").write_bytes(raw)
    plan_error(tmp_path, "config.json", fragment)


def test_config_too_large(tmp_path):
    with (tmp_path / "config.json").open("wb") as f:
        f.truncate(65 * 2**20)
    plan_error(tmp_path, "config.json", "is too large for this kind of file")


def test_config_that_is_a_fifo_or_a_folder(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    plan_error(tmp_path, "no config.json")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    plan_error(tmp_path, "no config.json")


def test_config_declaring_far_more_than_its_weights(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4096, "hidden_size": 4096}))
    convert_error(folder, tmp_path, "declares", "parameters, but the weights hold only")


# --- safetensors -------------------------------------------------------------------------------------------------


def rewrite_header(file, change):
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def first(header):
    return next(v for k, v in sorted(header.items()) if k != "__metadata__")


def second(header):
    return [v for k, v in sorted(header.items()) if k != "__metadata__"][1]


SAFETENSORS = {  # id: (change to the parsed header, words the error must carry)
    "unknown-dtype": (lambda h: first(h).update(dtype="Q9"), "unknown dtype 'Q9'"),
    "dtype-not-a-string": (lambda h: first(h).update(dtype=["F32"]), "unknown dtype"),
    "shape-negative": (lambda h: first(h).update(shape=[-1, 64]), "malformed shape"),
    "shape-2^56": (lambda h: first(h).update(shape=[2**56 + 384, 64]), "malformed shape"),
    "shape-rank-9": (lambda h: first(h).update(shape=[1] * 9), "malformed shape"),
    "shape-vs-bytes": (lambda h: first(h).update(shape=[1, 1]), "needs 4 bytes, its offsets span"),
    "offsets-reversed": (lambda h: first(h).update(data_offsets=first(h)["data_offsets"][::-1]), "needs"),
    "offsets-overlap": (
        lambda h: second(h).update(data_offsets=[0, second(h)["data_offsets"][1] - second(h)["data_offsets"][0]]),
        "overlaps the tensor before it",
    ),
    "offsets-past-end": (
        lambda h: first(h).update(data_offsets=[first(h)["data_offsets"][0], 2**40]),
        "needs",
    ),
    "offsets-malformed": (lambda h: first(h).update(data_offsets="0-10"), "malformed data_offsets"),
    "tensor-not-object": (lambda h: h.update(extra=[1, 2]), "is described by a list"),
    "metadata-not-strings": (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must map names"),
}


@pytest.mark.parametrize("case", SAFETENSORS)
def test_safetensors_headers(case, tiny_llama, tmp_path):
    change, fragment = SAFETENSORS[case]
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    rewrite_header(folder / "model.safetensors", change)
    convert_error(folder, tmp_path, "model.safetensors", fragment)


SAFETENSORS_BYTES = {  # id: (the file's bytes from the real ones, words the error must carry)
    "empty-file": (lambda raw: b"", "header length"),
    "header-length-huge": (lambda raw: (2**62).to_bytes(8, "little") + raw[8:], "header length"),
    "header-not-json": (lambda raw: raw[:8] + b"\x00" + raw[9:], "not valid JSON"),
    "truncated": (lambda raw: raw[:-10], "truncated or corrupt"),
    "padded": (lambda raw: raw + b"\0" * 16, "truncated or corrupt"),
}


@pytest.mark.parametrize("case", SAFETENSORS_BYTES)
def test_safetensors_bytes(case, tiny_llama, tmp_path):
    change, fragment = SAFETENSORS_BYTES[case]
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(change(weights.read_bytes()))
    convert_error(folder, tmp_path, "model.safetensors", fragment)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_weights_that_are_not_regular_files(kind, tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    if kind == "fifo":
        os.mkfifo(folder / "model.safetensors")
    else:
        (folder / "model.safetensors").symlink_to("/dev/zero")
    convert_error(folder, tmp_path, "not a regular file")


@pytest.mark.parametrize(
    "shard, fragment",
    [("../outside.safetensors", "is not a file name in the model folder"), ("gone.safetensors", "not in the folder")],
)
def test_a_weight_index_naming_other_files(shard, fragment, tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    convert_error(folder, tmp_path, "model.safetensors.index.json", fragment)


def test_no_weights_at_all(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    convert_error(folder, tmp_path, "no weights found")


# --- pickle and other code a checkpoint can carry ------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_never_runs_even_with_allow_pickle(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / MARKER
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    convert_error(folder, tmp_path, "refused by torch's weights-only loader", extra=["--allow-pickle"])
    assert not marker.exists()


def test_allow_pickle_reads_only_the_weights_a_checkpoint_names(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / MARKER
    torch.save(Payload(marker), folder / "training_args.bin")
    convert_error(folder, tmp_path, "no weights found", extra=["--allow-pickle"])
    assert not marker.exists()


def test_pickle_weights_that_are_not_a_state_dict(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save([1, 2, 3], folder / "pytorch_model.bin")
    convert_error(folder, tmp_path, "not a state dict of named tensors", extra=["--allow-pickle"])


def test_remote_code_is_never_imported_without_trust(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    marker = tmp_path / MARKER
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.C", "AutoModelForCausalLM": "modeling_evil.M"}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("convert", str(folder), "-t", "host", "-f", "mlx", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert not marker.exists()


def test_a_chat_template_reaching_for_python_is_refused(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    marker = tmp_path / MARKER
    template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    (folder / "chat_template.jinja").write_text(template)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    convert_error(folder, tmp_path, "chat template was refused", "SecurityError")
    assert not marker.exists()


def test_a_tokenizer_that_cannot_be_read(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    convert_error(folder, tmp_path, "its tokenizer cannot be read")


# --- GGUF --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return gguf_seed(tmp_path_factory.mktemp("gguf"))


GGUFS = {  # id: (change to the seed's bytes, words the error must carry)
    "bad-magic": (lambda raw: b"GGUX" + raw[4:], "no GGUF magic"),
    "version-1": (lambda raw: raw[:4] + struct.pack("<I", 1) + raw[8:], "version 1"),
    "version-99": (lambda raw: raw[:4] + struct.pack("<I", 99) + raw[8:], "version 99"),
    "tensor-count-huge": (lambda raw: raw[:8] + struct.pack("<Q", 2**60) + raw[16:], "cannot fit in"),
    "kv-count-huge": (lambda raw: raw[:16] + struct.pack("<Q", 2**40) + raw[24:], "cannot fit in"),
    "key-length-past-end": (lambda raw: raw[:24] + struct.pack("<Q", 2**50) + raw[32:], "truncated"),
    "too-short": (lambda raw: raw[:20], "too short"),
    "truncated-data": (lambda raw: raw[: len(raw) - 40], "past the end"),
    "truncated-header": (lambda raw: raw[:60], "truncated"),
}


@pytest.mark.parametrize("case", GGUFS)
def test_gguf_headers(case, gguf_bytes, tmp_path):
    change, fragment = GGUFS[case]
    file = tmp_path / "m.gguf"
    file.write_bytes(change(gguf_bytes))
    plan_error(file, "m.gguf", "not a valid GGUF file", fragment)


def gguf_file(tmp_path, kvs=(), tensors=()):
    """A GGUF file written by hand: `kvs` as (key, type id, packed value), `tensors` as (name, dims, type, offset)."""

    def string(text):
        return struct.pack("<Q", len(text)) + text.encode()

    raw = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, kind, value in kvs:
        raw += string(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        raw += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        raw += struct.pack("<IQ", kind, offset)
    raw += b"\0" * (-len(raw) % 32) + b"\0" * 256
    (tmp_path / "m.gguf").write_bytes(raw)
    return tmp_path / "m.gguf"


GGUF_BUILT = {
    "unknown-value-type": ({"kvs": [("a", 77, b"")]}, "unknown value type 77"),
    "nested-array": ({"kvs": [("a", 9, struct.pack("<IQ", 9, 1))]}, "an array of arrays"),
    "array-past-end": ({"kvs": [("a", 9, struct.pack("<IQ", 6, 2**40))]}, "truncated"),
    "alignment-not-power-of-two": ({"kvs": [("general.alignment", 4, struct.pack("<I", 24))]}, "power of two"),
    "five-dimensions": ({"tensors": [("t", [1] * 5, 0, 0)]}, "has 5 dimensions"),
    "unknown-ggml-type": ({"tensors": [("t", [4], 99, 0)]}, "unknown ggml type 99"),
    "dimension-huge": ({"tensors": [("t", [2**62, 0], 0, 0)]}, "has a shape beyond any real tensor"),
    "block-not-dividing": ({"tensors": [("t", [33], 8, 0)]}, "not a multiple of its block of 32"),
    "misaligned-offset": ({"tensors": [("t", [4], 0, 3)]}, "not aligned to 32"),
    "overlapping-tensors": ({"tensors": [("a", [16], 0, 0), ("b", [16], 0, 32)]}, "overlaps"),
    "duplicate-names": ({"tensors": [("a", [4], 0, 0), ("a", [4], 0, 32)]}, "two tensors share a name"),
    "data-past-end": ({"tensors": [("t", [2**20], 0, 0)]}, "past the end"),
}


@pytest.mark.parametrize("case", GGUF_BUILT)
def test_gguf_built_by_hand(case, tmp_path):
    parts, fragment = GGUF_BUILT[case]
    plan_error(gguf_file(tmp_path, **parts), "not a valid GGUF file", fragment)


def test_gguf_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "m.gguf")
    code, out, err = run_cli("plan", str(tmp_path / "m.gguf"), "-t", "m2-air")
    assert_one_line_error(code, out, err, "not a model folder or a .gguf file")


# --- CTranslate2 -------------------------------------------------------------------------------------------------


@pytest.fixture
def ct2_folder(tmp_path, fixture_whisper):
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(ct2_seed(folder, vocab=51864))  # tiny.en's tokenizer's ids fit
    shutil.copy(fixture_whisper / "tokenizer.json", folder / "tokenizer.json")
    return folder


def named(name: str) -> bytes:
    raw = name.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


BIAS = named("encoder/conv1/bias") + b"\x01" + struct.pack("<I", 8)  # a rank-1 variable of 8 values
CT2 = {  # id: (bytes replaced, their replacement, words the error must carry)
    "bad-version": (struct.pack("<I", 6) + named("WhisperSpec"), struct.pack("<I", 60) + named("WhisperSpec"), "60"),
    "other-spec": (named("WhisperSpec"), named("Wav2VecSpecc"), "CTranslate2 Wav2VecSpecc model"),
    "rank-9": (named("encoder/conv1/bias") + b"\x01", named("encoder/conv1/bias") + b"\x09", "has rank 9"),
    "unknown-dtype": (BIAS + b"\x00", BIAS + b"\x09", "unknown data type 9"),
    "size-vs-shape": (BIAS, BIAS[:-4] + struct.pack("<I", 7), "has 32 bytes for shape [7]"),
    "alias-to-nothing": (
        named("decoder/projection/weight") + named("decoder/embeddings/weight"),
        named("decoder/projection/weight") + named("decoder/embeddingz/weight"),
        "names no variable",
    ),
}


@pytest.mark.parametrize("case", CT2)
def test_ct2_model_bin(case, ct2_folder):
    old, new, fragment = CT2[case]
    raw = (ct2_folder / "model.bin").read_bytes()
    assert old in raw
    (ct2_folder / "model.bin").write_bytes(raw.replace(old, new, 1))
    plan_error(ct2_folder, "ct2", fragment)


def test_ct2_truncated_and_empty(ct2_folder):
    raw = (ct2_folder / "model.bin").read_bytes()
    (ct2_folder / "model.bin").write_bytes(raw[:300])
    plan_error(ct2_folder, "model.bin", "truncated")
    (ct2_folder / "model.bin").write_bytes(b"")
    plan_error(ct2_folder, "model.bin", "too short")


def test_ct2_without_its_tokenizer(ct2_folder):
    (ct2_folder / "tokenizer.json").unlink()
    plan_error(ct2_folder, "no tokenizer.json beside model.bin")


def test_ct2_zero_scale_is_refused_on_convert(ct2_folder, tmp_path):
    raw = (ct2_folder / "model.bin").read_bytes()
    scale = np.full(24, 50.0, np.float32).tobytes()
    assert scale in raw
    (ct2_folder / "model.bin").write_bytes(raw.replace(scale, np.zeros(24, np.float32).tobytes(), 1))
    code, out, err = run_cli("convert", str(ct2_folder), "-t", "host", "-f", "ct2", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "weights do not fit Whisper", "zero, negative or not finite")


def test_plan_reads_only_the_header_of_a_ct2_model(ct2_folder):
    """`plan` promises config only: damaged weight bytes (past the header) do not matter to it."""
    raw = bytearray((ct2_folder / "model.bin").read_bytes())
    embedding = raw.find(named("decoder/embeddings/weight"))
    start = embedding + len(named("decoder/embeddings/weight")) + 1 + 8 + 1 + 4  # rank, shape, dtype, size
    raw[start : start + 51864 * 8 * 2] = b"\xff" * (51864 * 8 * 2)  # NaN halves: garbage, the header intact
    (ct2_folder / "model.bin").write_bytes(bytes(raw))
    code, out, err = run_cli("plan", str(ct2_folder), "-t", "m2-air", "--json")
    assert code == 0, err
    assert json.loads(out)["model_type"] == "whisper"


# --- manifests, bench results, other files the runtime reads ------------------------------------------------------


@pytest.fixture(scope="module")
def output(tiny_llama, tmp_path_factory):
    return mlx_fp16_output(tiny_llama, tmp_path_factory.mktemp("o") / "out")


def altered(output, tmp_path, change):
    copy = shutil.copytree(output, tmp_path / "out")
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


MANIFESTS = {
    "file-path-escapes": (
        lambda m: m["artifacts"][0]["files"][0].update(path="../../../../etc/passwd"),
        "is not a relative path inside",
    ),
    "artifact-path-absolute": (lambda m: m["artifacts"][0].update(path="/usr/lib"), "is not a relative path inside"),
    "schema-version": (lambda m: m.update(schema_version=99), "schema version 99"),
    "plan-field-type": (lambda m: m["plan"]["steps"][0].update(fits="yes"), "field fits is missing or not a bool"),
    "metric-type": (lambda m: m["artifacts"][0]["parity"]["metrics"].update(kl_mean="low"), "metrics.kl_mean"),
    "parity-status": (lambda m: m["artifacts"][0]["parity"].update(status="great"), "parity.status must be"),
    "sha256-malformed": (lambda m: m["artifacts"][0]["files"][0].update(sha256="abc"), "malformed sha256"),
    "artifacts-not-a-list": (lambda m: m.update(artifacts={}), "field artifacts is missing or not a list"),
}


@pytest.mark.parametrize("case", MANIFESTS)
@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_manifests_are_data(case, command, output, tmp_path):
    change, fragment = MANIFESTS[case]
    copy = altered(output, tmp_path, change)
    code, out, err = run_cli(command, str(copy))
    assert_one_line_error(code, out, err, "manifest.json", fragment)


def test_a_manifest_file_linking_outside_the_output(output, tmp_path):
    copy = shutil.copytree(output, tmp_path / "out")
    manifest = json.loads((copy / "manifest.json").read_text())
    linked = copy / manifest["artifacts"][0]["files"][0]["path"]
    linked.unlink()
    linked.symlink_to("/etc/hostname")
    code, out, err = run_cli("inspect", str(copy))
    assert_one_line_error(code, out, err, "leads outside the output folder")


def test_a_broken_bench_result(output, tmp_path):
    copy = shutil.copytree(output, tmp_path / "out")
    (copy / "bench.json").write_text(json.dumps({"results": [{"prompt_tokens": "many"}]}))
    code, out, err = run_cli("check", str(copy), "-t", "host")
    assert_one_line_error(code, out, err, "bench.json: not a bench result this edgeport wrote")


@pytest.mark.parametrize(
    "option, content, fragment",
    [
        ("--text", b"\xff\xfe\xfa", "not UTF-8 text"),
        ("--text", "fifo", "not a regular file"),
    ],
)
def test_bench_inputs(option, content, fragment, output, tmp_path):
    file = tmp_path / "input"
    if content == "fifo":
        os.mkfifo(file)
    else:
        file.write_bytes(content)
    code, out, err = run_cli("bench", str(output), option, str(file), "--prompt-tokens", "64")
    assert_one_line_error(code, out, err, fragment)


@pytest.mark.parametrize(
    "content, fragment",
    [(b"RIFF\x00\x00\x00\x00WAVEjunk", "cannot read it as audio"), ("fifo", "not a regular file")],
)
def test_audio_inputs(content, fragment, tmp_path):
    from edgeport.audio import load_audio
    from edgeport.errors import EdgeportError

    file = tmp_path / "speech.wav"
    if content == "fifo":
        os.mkfifo(file)
    else:
        file.write_bytes(content)
    with pytest.raises(EdgeportError, match=fragment):
        load_audio(file)


def test_audio_with_nan_samples(tmp_path):
    import soundfile

    from edgeport.audio import load_audio
    from edgeport.errors import EdgeportError

    samples = np.zeros(16000, np.float32)
    samples[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(EdgeportError, match="not numbers"):
        load_audio(tmp_path / "nan.wav")


# --- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-t", "m2-air", "--ram", "-8"], "--ram -8: m2-air comes with"),
        (["-t", "m2-air", "--formats", "tflite"], "--formats tflite"),
        (["-t", "m2-air", "--quant", "q11"], "q11"),
        (["-t", "m2-airr"], "unknown target 'm2-airr'"),
    ],
)
def test_bad_options(args, fragment, tiny_llama):
    code, out, err = run_cli("plan", str(tiny_llama), *args)
    assert_one_line_error(code, out, err, fragment)


@pytest.mark.parametrize(
    "error, words",
    [
        (
            "GatedRepoError",
            "is gated",
        ),
        ("RepositoryNotFoundError", "no such model on the Hugging Face Hub"),
        ("RevisionNotFoundError", "has no revision 'v9'"),
    ],
)
def test_hub_errors_say_what_to_do(error, words, monkeypatch):
    import huggingface_hub
    import huggingface_hub.errors

    kind = getattr(huggingface_hub.errors, error)
    failure = kind.__new__(kind)  # as the client raises it, without a live HTTP response behind it
    Exception.__init__(failure, "refused")

    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    code, out, err = run_cli("plan", "org/model", "-t", "m2-air", "--revision", "v9")
    assert_one_line_error(code, out, err, f"org/model: {words}")


def test_a_hub_id_that_is_not_cached_offline(tmp_path):
    code, out, err = run_cli("plan", "nobody-here/no-such-model", "-t", "m2-air")
    assert_one_line_error(code, out, err, "nobody-here/no-such-model: is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in err


def test_a_tokenizer_file_linking_outside_the_model_is_not_carried_along(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (folder / "merges.txt").unlink(missing_ok=True)
    (folder / "merges.txt").symlink_to(secret)
    convert_error(folder, tmp_path, "merges.txt: links to", "outside the model folder")


def test_bench_on_an_output_whose_files_went_missing(output, tmp_path):
    copy = shutil.copytree(output, tmp_path / "out")
    next((copy / "mlx").glob("*.safetensors")).unlink()
    code, out, err = run_cli("bench", str(copy))
    assert_one_line_error(code, out, err, "is missing or resized since conversion", "edgeport inspect")


def test_an_output_folder_that_cannot_be_made(tiny_llama, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli("convert", str(tiny_llama), "-t", "host", "--out", str(tmp_path / "file" / "o"))
    assert_one_line_error(code, out, err, "cannot make its folder")


def test_a_cache_folder_that_cannot_be_used(fixture_gguf, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli("convert", str(fixture_gguf), "-t", "host", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, out, err, "cannot be used", "EDGEPORT_CACHE")
    assert not (tmp_path / "o").exists()


def test_a_damaged_host_measurement_is_measured_again(tmp_path, monkeypatch):
    from edgeport import targets

    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path))
    for damaged in ('{"key": 1}', "not json", '{"key": "x", "bandwidth_gbs": "fast", "cpu_tflops": 1}'):
        (tmp_path / "host.json").write_text(damaged)
        assert targets.load("host").bandwidth_gbs > 0


def test_a_lone_surrogate_escape_is_not_text(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama", "name": "\\ud800"}')
    plan_error(tmp_path, "config.json", "is not valid JSON")
