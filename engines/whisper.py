"""The Whisper loop every engine runs: features, 30 s windows, the prompt (language detected per window or given),
suppressed tokens and greedy search. An engine adds only what it does itself (encode a window, step the decoder
over its KV cache), so transcripts and timings differ only by the engine.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.audio import SAMPLE_RATE, windows
from edgeport.errors import EdgeportError

MULTILINGUAL_VOCAB = 51865  # OpenAI's rule: English-only Whisper models have a smaller vocabulary
MAX_TARGET_POSITIONS = 448  # every Whisper's decoder context


class WhisperRunner:
    """The shared half of every Whisper runner: tokenizer, features, prompt and greedy search. An engine adds
    `encode(features)` (one window's log-mel features, [1, mels, 3000]) and `begin(encoded)` + `step(tokens)`
    (the logits after `tokens`, with the engine keeping its own KV cache), or its own `decode`."""

    engine = "?"

    def __init__(self, folder: Path, config: dict | None = None):
        """`config`: the transformers config's decoding fields, when `folder` holds none (CTranslate2)."""
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        self.config = config or json.loads((folder / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.features = WhisperFeatureExtractor.from_pretrained(folder)
        self.eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.multilingual = self.config["vocab_size"] >= MULTILINGUAL_VOCAB
        self.languages = language_tokens(self.tokenizer) if self.multilingual else {}
        self.detected: list[str] = []  # the language found in each window since the last `transcribe`
        self.use_language(None)
        vocab = self.config["vocab_size"]
        self.suppressed = np.zeros(vocab, bool)  # every special token but the end (no timestamps), and the config's
        self.suppressed[[t for t in self.config.get("suppress_tokens") or [] if t < vocab]] = True
        self.suppressed[self.eot + 1 :] = True
        self.suppressed_first = self.suppressed.copy()  # a window does not start with a blank or end at once
        self.suppressed_first[[t for t in self.config.get("begin_suppress_tokens") or [] if t < vocab]] = True

    def use_language(self, language: str | None, task: str = "transcribe") -> None:
        """Transcribe (or translate into English) `language`, or, with None, the language Whisper detects in each
        window. English-only models have neither."""
        if task not in ("transcribe", "translate"):
            raise EdgeportError(f"--task {task}: Whisper transcribes or translates")
        if not self.multilingual and task == "translate":
            raise EdgeportError("--task translate needs a multilingual Whisper model; this one is English-only")
        if language is not None and self.multilingual and language not in self.languages:
            raise EdgeportError(f"--language {language}: the model knows {', '.join(sorted(self.languages))}")
        self.language, self.task = language, task
        self.prompt = start_tokens(self.tokenizer, self.config, language or "en", task)
        self.max_tokens = MAX_TARGET_POSITIONS // 2 - len(self.prompt)  # Whisper's own sample length

    def prompt_for(self, encoded) -> list[int]:
        """The prompt for one window: with no language given to a multilingual model, the language is detected as
        Whisper does, by one decoder step from <|startoftranscript|>, the most likely language token winning."""
        if not self.multilingual or self.language:
            return self.prompt
        language = self.detect_language(encoded)
        self.detected.append(language)
        return start_tokens(self.tokenizer, self.config, language, self.task)

    def detect_language(self, encoded) -> str:
        self.begin(encoded)
        logits = self.step(self.prompt[:1])
        codes = list(self.languages)
        return codes[int(np.argmax(logits[[self.languages[c] for c in codes]]))]

    def mel(self, audio: np.ndarray) -> np.ndarray:
        return self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)

    def decode(self, encoded) -> list[int]:
        """Greedy tokens after the prompt, up to the end token."""
        prompt = self.prompt_for(encoded)
        self.begin(encoded)
        logits = self.step(prompt)
        tokens: list[int] = []
        while len(tokens) < self.max_tokens:
            logits = np.where(self.suppressed_first if not tokens else self.suppressed, -np.inf, logits)
            token = int(np.argmax(logits))
            if token == self.eot:
                break
            tokens.append(token)
            logits = self.step([token])
        return tokens


def start_tokens(tokenizer, config: dict, language: str, task: str = "transcribe") -> list[int]:
    """<|startoftranscript|>, then for multilingual models the language and the task (<|transcribe|> or
    <|translate|>), then <|notimestamps|>."""
    names = ["<|startoftranscript|>"]
    if config["vocab_size"] >= MULTILINGUAL_VOCAB:
        names += [f"<|{language}|>", f"<|{task}|>"]
    names.append("<|notimestamps|>")
    ids = tokenizer.convert_tokens_to_ids(names)
    unknown = [name for name, i in zip(names, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise EdgeportError(f"the tokenizer has no {', '.join(unknown)} token (language '{language}')")
    return ids


def language_tokens(tokenizer) -> dict[str, int]:
    """Language code -> token id: Whisper's language tokens lie between <|startoftranscript|> and <|translate|>."""
    first, last = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|translate|>"])
    names = tokenizer.convert_ids_to_tokens(list(range(first + 1, last)))
    return {name[2:-2]: first + 1 + i for i, name in enumerate(names)}


@dataclass
class Transcript:
    text: str
    audio_s: float
    wall_s: float
    encode_s: list[float]  # per window
    decode_s: list[float]
    tokens: list[int]  # decoded per window
    languages: list[str]  # detected per window (empty when the language was given or the model is English-only)


def transcribe(runner, audio: np.ndarray) -> Transcript:
    """`audio` (16 kHz mono) through `runner`, window by window."""
    if len(audio) == 0:
        raise EdgeportError("no audio to transcribe")
    start = time.perf_counter()
    runner.detected = []
    encode_s, decode_s, counts, ids = [], [], [], []
    for begin, end in windows(audio):
        mel = runner.mel(audio[begin:end])
        t0 = time.perf_counter()
        encoded = runner.encode(mel)
        t1 = time.perf_counter()
        tokens = runner.decode(encoded)
        encode_s.append(t1 - t0)
        decode_s.append(time.perf_counter() - t1)
        counts.append(len(tokens))
        ids += tokens
    text = runner.tokenizer.decode(ids, skip_special_tokens=True).strip()
    wall = time.perf_counter() - start
    return Transcript(text, len(audio) / SAMPLE_RATE, wall, encode_s, decode_s, counts, list(runner.detected))
