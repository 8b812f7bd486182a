"""GGUF artifacts on llama.cpp, through llama-cpp-python: its generator for the bench (greedy, the prompt evaluated
in one batch), its logits for parity, and its own tokenizer held against the source's. On a Mac llama.cpp runs on
Metal; elsewhere on the CPU, with the threads `threads()` gives."""

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.engines import missing
from edgeport.engines.loop import Token, TokenClock, hf_tokenizer
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout
from edgeport.machine import CPU_ARCHS, ON_MAC, cpu_arch

MODEL_FILE = "model.gguf"
PARITY_CONTEXT = 512  # the longest parity sequence is about 200 tokens; every position's logits are kept for it
BATCH = 512  # prompt tokens per llama.cpp batch, its default
# Text whose splitting tells pre-tokenizers apart: digits, contractions, whitespace runs, punctuation, non-Latin text.
TOKENIZER_CHECK = (
    "The 3 summaries (1234567 tokens) aren't ready; they'll be done by 10:45.\n\n   Indented\tline — "
    "naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂!!! x=a+b*c  /path/to_file.py #42 ...\r\nEnd"
)


def unavailable_here() -> str | None:
    return missing("llama_cpp", "gguf")


def threads() -> int:
    """llama.cpp's threads: every core this process may use (llama.cpp's own default counts physical cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def quiet_llama_cpp():
    """llama.cpp's log lines stay off the screen: what the library writes to the process's stderr itself goes nowhere
    while it loads or quantizes, and its logger (which `Llama` sets to errors) stays silent in this process after,
    for the lines a context prints when it is freed."""
    from llama_cpp._utils import suppress_stdout_stderr

    logger = logging.getLogger("llama-cpp-python")
    try:
        with suppress_stdout_stderr(disable=False):
            yield
    finally:
        logger.setLevel(logging.CRITICAL + 1)


def runner(layout: Layout, folder: Path):
    return GGUFRunner(folder)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    """llama.cpp here; where the device runs the file with other kernels (Metal, CUDA, another CPU's), what parity
    measured is said not to be those."""
    wanted = layout.backend or ("Metal" if layout.shape == "gpu" else backend_here())  # outputs before `backend`
    here = backend_here()
    unchecked = None if wanted == here else f"llama.cpp on {_named(wanted)} (measured on {_named(here)})"
    return GGUFRunner(folder, context=PARITY_CONTEXT), unchecked


def backend_here() -> str:
    return "Metal" if ON_MAC else cpu_arch()


def _named(backend: str) -> str:
    return f"{backend} CPUs" if backend in CPU_ARCHS else backend


class GGUFRunner:
    """A GGUF model in llama.cpp. Opened for parity (a short `context`) it keeps every position's logits, which cost
    context × vocabulary floats; for the bench only the last."""

    def __init__(self, path: Path, context: int | None = None):
        reason = unavailable_here()
        if reason:
            raise EdgeportError(reason)
        import llama_cpp

        self.tokenizer = hf_tokenizer(path)  # chat templates, as every runner's
        with quiet_llama_cpp():
            self.model = llama_cpp.Llama(
                str(path / MODEL_FILE),
                n_ctx=context or 4096,
                n_batch=BATCH,
                n_threads=threads(),
                n_threads_batch=threads(),
                n_gpu_layers=-1 if ON_MAC else 0,
                logits_all=context is not None,
                use_mmap=False,
                verbose=False,
            )
        self.llama_cpp = llama_cpp
        self.vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        device = "Metal" if ON_MAC else f"CPU, {threads()} threads"
        self.engine = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {device})"

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.model.n_ctx():
            raise EdgeportError(f"llama.cpp's context holds {self.model.n_ctx()} tokens; parity asks {len(ids)}")
        self.model.reset()
        self.model.eval(ids)
        return np.array(self.model.scores[: len(ids)], dtype=np.float32)

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        self.model.reset()  # no prefix of an earlier run reused: every run evaluates its whole prompt
        start = time.perf_counter()
        clock = TokenClock(len(prompt), start)
        for token in self.model.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            if self.llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            yield clock.token(int(token))
            if clock.generated >= max_tokens:
                break


@dataclass(frozen=True)
class TokenizerAgreement:
    tokens: int  # of the check text, as the source's tokenizer splits it
    mismatch: str  # "" when llama.cpp gives the same ids, else the first difference in words


def tokenizer_agreement(model_file: Path, source_folder: Path) -> TokenizerAgreement:
    """Whether llama.cpp, reading only the vocabulary of `model_file`, splits TOKENIZER_CHECK into the ids the
    source's tokenizer gives."""
    import llama_cpp

    with quiet_llama_cpp():
        vocab_only = llama_cpp.Llama(str(model_file), vocab_only=True, verbose=False)
    theirs = vocab_only.tokenize(TOKENIZER_CHECK.encode(), add_bos=False, special=False)
    ours = hf_tokenizer(source_folder)(TOKENIZER_CHECK, add_special_tokens=False)["input_ids"]
    vocab_only.close()
    if theirs == ours:
        return TokenizerAgreement(len(ours), "")
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours)))
    return TokenizerAgreement(len(ours), f"token {at}: {theirs[at : at + 3]} against {ours[at : at + 3]}")
