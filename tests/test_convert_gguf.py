"""GGUF for llama.cpp, for real on tiny models: written by gguf's writer, quantized by llama.cpp's own quantizer, run
and checked through llama-cpp-python (installed by `make install`: it compiles llama.cpp)."""

import json
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import convert, make_model, run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from edgeport import build, quantization
from edgeport.convert import gguf as gguf_convert
from edgeport.engines.gguf import MODEL_FILE, TOKENIZER_CHECK, GGUFRunner, tokenizer_agreement
from edgeport.errors import EdgeportError
from edgeport.machine import cpu_arch
from edgeport.parity import BOUNDS
from edgeport.source import GGUF_CAUSAL_LM_TYPES

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install` (it compiles llama.cpp)")


def source_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def read_gguf(file):
    reader = gguf.GGUFReader(file)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def q8_output(request, tmp_path_factory):
    model = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("gguf") / request.param
    return model, out, convert(model, out, "host", "--formats", "gguf", "--quant", "Q8_0")


def test_q8_gguf_runs_in_llama_cpp_as_the_source_does(q8_output):
    """The permuted query and key rows (Llama) and the unpermuted ones with biases (Qwen2) both give the source's
    logits back through llama.cpp: the parity the manifest records, and here directly."""
    model, out, result = q8_output
    (artifact,) = result["artifacts"]
    assert artifact["format"] == "gguf" and artifact["quantization"] == "Q8_0"
    assert artifact["parity"]["status"] == "passed", artifact["parity"]
    assert artifact["parity"]["metrics"]["top1_agreement"] >= 0.93
    assert artifact["details"]["tokenizer_checked_tokens"] > 20
    ids = [5, 17, 42, 99, 7, 250, 3, 61]
    ours = GGUFRunner(out / "gguf", context=64).logits(ids)
    theirs = source_logits(model, ids)
    assert ours.shape == theirs.shape
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.85
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


def test_gguf_file_holds_the_models_keys_tokenizer_and_quantized_weights(q8_output):
    model, out, _ = q8_output
    config = json.loads((model / "config.json").read_text())
    fields, tensors = read_gguf(out / "gguf" / MODEL_FILE)
    arch = fields["general.architecture"]
    assert arch == {"llama": "llama", "qwen2": "qwen2"}[config["model_type"]]
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert "im_start" in fields["tokenizer.chat_template"]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with safe_open(model / "model.safetensors", "pt") as weights:
        assert len(tensors) == len(list(weights.keys()))  # each weight once, nothing left out
    assert (out / "gguf" / "tokenizer.json").exists()  # the app files beside it, as every artifact's


def test_q4_k_m_is_llama_cpps_mix_and_judged_as_one(tiny_llama, tmp_path):
    result = convert(tiny_llama, tmp_path / "out", "host", "--formats", "gguf", "--parity", "fast")
    (artifact,) = result["artifacts"]
    assert artifact["quantization"] == "Q4_K_M"  # the host profile's choice
    _, tensors = read_gguf(tmp_path / "out" / "gguf" / MODEL_FILE)
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    # Rows of 64 are too short for K-quants' 256-blocks: llama.cpp falls back to Q5_0, and its _M mix still raises
    # the output projection and, in the last layer, v_proj and down_proj (to Q8_0 here).
    assert kinds["output.weight"] == "Q8_0" and kinds["blk.1.ffn_down.weight"] == "Q8_0"
    assert kinds["blk.0.ffn_up.weight"] == "Q5_0" and kinds["output_norm.weight"] == "F32"
    mixed = BOUNDS["mixed_4_6"]  # the bounds of mlx-lm's mix of the same shape
    assert artifact["parity"]["bounds"] == {"top1_agreement": 0.7, "kl_mean": 0.5, "ppl_delta": 0.3}
    assert (mixed.top1_agreement, mixed.kl_mean, mixed.ppl_delta) == (0.7, 0.5, 0.3)
    assert artifact["parity"]["status"] == "passed", artifact["parity"]


def test_llama3_rope_scaling_becomes_llama_cpps_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = make_model(tmp_path / "llama3", "llama", rope_parameters={"rope_theta": 500000.0, **scaling})
    config = json.loads((folder / "config.json").read_text())
    architecture = gguf_convert.Architecture.of(config)
    gguf_convert.write_gguf(folder, architecture, tmp_path / "f16.gguf")
    _, tensors = read_gguf(tmp_path / "f16.gguf")
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    # Meta's published rule: wavelengths under original/high_freq_factor keep their frequency, those over
    # original/low_freq_factor are divided by `factor`, the band between is interpolated.
    dim, theta = architecture.head_dim, 500000.0
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelength = 2 * np.pi / freqs
    smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelength < 64 / 4.0, 1.0, np.where(wavelength > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth))
    )
    np.testing.assert_allclose(factors, expected, rtol=1e-4)


def test_tokenizer_mismatch_and_unknown_pre_tokenizers_are_refused(tiny_llama, tmp_path):
    with pytest.raises(EdgeportError, match=r"pre-tokenizer \(Whitespace\) is not one the GGUF writer maps"):
        gguf_convert._pre_tokenizer({"type": "Whitespace"}, tmp_path / "tokenizer.json")
    # A file whose vocabulary is another tokenizer's: llama.cpp's split no longer matches the source's.
    other = make_model(tmp_path / "other", "llama")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: (i + 7) % len(spec["model"]["vocab"]) for t, i in spec["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((tiny_llama / "config.json").read_text())
    gguf_convert.write_gguf(tiny_llama, gguf_convert.Architecture.of(config), tmp_path / "f16.gguf")
    assert tokenizer_agreement(tmp_path / "f16.gguf", tiny_llama).mismatch == ""
    assert "against" in tokenizer_agreement(tmp_path / "f16.gguf", other).mismatch


def test_families_the_writer_does_not_map_are_listed_not_built(tmp_path):
    folder = make_model(tmp_path / "phi3", "phi3", pad_token_id=0)
    code, _, err = run_cli("convert", str(folder), "-t", "host", "-f", "gguf", "--out", str(tmp_path / "o"))
    assert code == 3 and "GGUF writer does not map phi3" in err, err
    assert set(GGUF_CAUSAL_LM_TYPES) == set(gguf_convert.ARCHITECTURES)


def test_a_missing_llama_cpp_leaves_gguf_unbuilt_with_the_install_line(monkeypatch):
    import edgeport.engines as engines

    real = engines.missing
    monkeypatch.setattr(engines, "missing", lambda p, e: "llama_cpp is missing" if p == "llama_cpp" else real(p, e))
    from edgeport.convert import missing_backend

    assert missing_backend("causal-lm", "gguf") == "llama_cpp is missing"
    assert missing_backend("causal-lm", "onnx") is None
    assert build.missing_backend is missing_backend


def test_gguf_quantizations_are_planned_at_llama_cpps_sizes():
    """Bits per weight as llama.cpp's types store them: Q8_0 and Q4_0 a float16 scale per 32, K-quants about the
    same per 32 within their 256-blocks."""
    bits = {name: quantization.get(name, "gguf").bits_per_weight() for name in ("Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0")}
    assert bits == {"Q8_0": 8.5, "Q5_K_M": 5.5, "Q4_K_M": 4.5, "Q4_0": 4.5}
    assert quantization.get("Q4_K_M", "gguf").bits_per_weight(high_share=0.2) == pytest.approx(4.5 + 0.2 * 2)


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the parity runs on Metal")
@pytest.mark.parametrize(
    "target, quant, backend",
    [
        ("m2-air", "Q4_K_M", "Metal"),
        ("rtx-4060-laptop", "Q4_K_M", "CUDA"),
        ("snapdragon-x-elite", "Q4_0", "arm64"),
        ("host", "Q4_K_M", cpu_arch()),
    ],
)
def test_parity_says_which_llama_cpp_kernels_it_did_not_run(tiny_llama, tmp_path, target, quant, backend):
    """A Mac's file runs on Metal, a GeForce laptop's on CUDA, a Snapdragon's on llama.cpp's Arm kernels: parity
    here measures this machine's CPU kernels, and says so where those are not the device's."""
    result = convert(tiny_llama, tmp_path / "out", target, "--formats", "gguf", "--parity", "fast")
    (artifact,) = result["artifacts"]
    layout = json.loads((tmp_path / "out" / "gguf" / "gguf.json").read_text())
    unit = "gpu" if backend in ("Metal", "CUDA") else "cpu"
    assert layout == {"compute_unit": unit, "file_type": f"MOSTLY_{quant}", "backend": backend}
    device = backend if backend in ("Metal", "CUDA") else f"{backend} CPUs"
    expected = [] if backend == cpu_arch() else [f"llama.cpp on {device} (measured on {cpu_arch()} CPUs)"]
    assert artifact["parity"]["not_checked"] == expected


def split_by(split: str) -> dict:
    """A pre-tokenizer as Llama 3's and Qwen2's tokenizer.json have it: a regex split, then bytes."""
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    "llama-bpe": split_by(gguf_convert.LLAMA3_SPLIT),
    "qwen2": split_by(gguf_convert.QWEN2_SPLIT),
}


def with_pre_tokenizer(tiny_model, folder, pre_tokenizer: dict):
    """`tiny_model` with a tokenizer whose merges cross every boundary a pre-tokenizer may split at (trained on the
    check text unsplit), then given `pre_tokenizer`: each way of splitting gives other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    config = json.loads((tiny_model / "config.json").read_text())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config["vocab_size"],
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TOKENIZER_CHECK] * 20, trainer)
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        (folder / file).write_bytes((tiny_model / file).read_bytes())
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>").save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre_tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    gguf_convert.write_gguf(folder, gguf_convert.Architecture.of(config), folder / "f16.gguf")
    return folder / "f16.gguf"


@pytest.mark.parametrize("name", PRE_TOKENIZERS)
def test_each_mapped_pre_tokenizer_splits_in_llama_cpp_as_in_the_source(name, tiny_llama, tmp_path):
    """Llama 3's, Qwen2's, SmolLM's and GPT-2's splitting (digits, contractions, whitespace runs, non-Latin text) as
    llama.cpp reimplements it under the name written: the same ids, token for token."""
    file = with_pre_tokenizer(tiny_llama, tmp_path / "model", PRE_TOKENIZERS[name])
    fields, _ = read_gguf(file)
    assert fields["tokenizer.ggml.pre"] == name
    agreement = tokenizer_agreement(file, tmp_path / "model")
    assert agreement.mismatch == "" and agreement.tokens > 10


@pytest.mark.parametrize("name", PRE_TOKENIZERS)
def test_a_wrong_pre_tokenizer_name_would_be_caught(name, tiny_llama, tmp_path, monkeypatch):
    """The check has teeth: each splitting written under another's name gives other ids on the check text."""
    shapes = {value: key for key, value in gguf_convert.PRE_TOKENIZERS.items()}
    wrong = next(other for other in PRE_TOKENIZERS if other != name)
    monkeypatch.setitem(gguf_convert.PRE_TOKENIZERS, shapes[name], wrong)
    file = with_pre_tokenizer(tiny_llama, tmp_path / "model", PRE_TOKENIZERS[name])
    assert tokenizer_agreement(file, tmp_path / "model").mismatch


@pytest.fixture(scope="module")
def host_pair(tiny_llama, tmp_path_factory):
    """A host output holding both fast CPU artifacts: the ONNX int4 shape and the GGUF Q4_K_M file."""
    out = tmp_path_factory.mktemp("race") / "host"
    convert(tiny_llama, out, "host", "--formats", "onnx,gguf", "--parity", "none")
    return out


@pytest.mark.parametrize("busy", [0.0, 90.0])
def test_bench_races_the_host_artifacts_and_keeps_the_order_only_when_quiet(host_pair, busy, monkeypatch, tmp_path):
    import psutil

    from edgeport import targets

    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: busy)
    code, stdout, err = run_cli("bench", str(host_pair), "-p", "64", "-n", "4", "-r", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    raced = result["raced"]
    assert {r["format"] for r in raced} == {"onnx", "gguf"}
    assert raced[0]["decode_tps"] >= raced[1]["decode_tps"] > 0
    assert result["format"] == raced[0]["format"]  # bench.json holds the fastest's figures, which check judges
    assert json.loads((host_pair / "bench.json").read_text())["format"] == raced[0]["format"]
    kept = targets.host_race()
    if busy:
        assert kept is None and "not kept for `host`" in err
    else:
        assert kept["decode_tps"] == {r["format"]: r["decode_tps"] for r in raced}
        assert [f.name for f in targets.load("host").formats][:2] == [r["format"] for r in raced]
        assert "fastest here" in targets.load("host").description


def test_host_lists_formats_in_the_measured_order(monkeypatch, tmp_path):
    from edgeport import targets

    monkeypatch.setenv("EDGEPORT_CACHE", str(tmp_path))
    assert [f.name for f in targets.load("host").formats] == ["onnx", "gguf", "mlx"]  # the profile's, unmeasured
    targets.record_host_race({"gguf": 70.3, "onnx": 64.3}, "m", 512)
    assert [f.name for f in targets.load("host").formats] == ["gguf", "onnx", "mlx"]
    (tmp_path / "host-race.json").write_text('{"key": "elsewhere", "decode_tps": {"mlx": 1}}')
    assert targets.host_race() is None  # another machine's race, or a file not as edgeport writes it: ignored
    (tmp_path / "host-race.json").write_text("[1, 2")
    assert targets.host_race() is None
