"""What every engine's loop shares: a streamed token with its running figures, the clock that makes them, the
tokenizer of an artifact folder, and the two attention-mask conventions the static graphs use."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.machine import peak_rss_bytes


@dataclass
class Token:
    """One streamed token and the engine's running figures. Its text is left to whoever wants it, after the run:
    detokenizing inside the timed loop would bill the runner's work to the engine."""

    id: int
    elapsed_s: float  # since generate was called
    prompt_tokens: int
    prompt_tps: float
    generated: int
    generation_tps: float
    peak_memory_gb: float


class TokenClock:
    """Turns a stream of generated tokens into Tokens with TTFT, prefill and decode rates; memory is the
    process's peak RSS (onnxruntime and Core ML report none of their own)."""

    def __init__(self, prompt_tokens: int, start: float):
        self.prompt_tokens, self.start = prompt_tokens, start
        self.generated = 0
        self.first_at = 0.0

    def token(self, token_id: int) -> Token:
        elapsed = time.perf_counter() - self.start
        self.generated += 1
        if self.generated == 1:
            self.first_at = elapsed
        decode_time = elapsed - self.first_at
        return Token(
            token_id,
            elapsed,
            self.prompt_tokens,
            self.prompt_tokens / self.first_at if self.first_at else 0.0,
            self.generated,
            (self.generated - 1) / decode_time if decode_time > 0 else 0.0,
            peak_rss_bytes() / 1e9,
        )


def hf_tokenizer(folder: Path):
    """The tokenizer copied beside an artifact (chat templates included), as transformers reads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def mask_new_at_end(filled: int, width: int, attended: int, value: float, dtype=np.float32) -> np.ndarray:
    """[1, 1, width, attended] additive mask over a cache whose `filled` first positions are taken and whose last
    `width` positions hold the new tokens (the graph puts them there): the filled ones and the new ones up to
    each token itself open, the rest `value`."""
    mask = np.full((1, 1, width, attended), value, dtype)
    mask[..., :filled] = 0
    mask[0, 0][:, attended - width :] = np.where(np.tri(width, dtype=bool), 0, value)
    return mask


def mask_at_position(position: int, width: int, attended: int, value: float, dtype=np.float16) -> np.ndarray:
    """[1, 1, width, attended] additive mask for `width` new tokens written into the cache at `position` (Core ML
    writes them in place): each row opens the cache up to its own token, the rest `value`."""
    mask = np.full((1, 1, width, attended), value, dtype)
    for row in range(width):
        mask[0, 0, row, : position + row + 1] = 0
    return mask
