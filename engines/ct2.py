"""CTranslate2 Whisper artifacts: CTranslate2 encodes each window and decodes it greedily in C++, with the prompt
and suppressed tokens of the shared loop."""

import json
import logging
import os
from pathlib import Path

import numpy as np

from edgeport.engines import missing
from edgeport.engines.whisper import WhisperRunner
from edgeport.layouts import Layout


def unavailable_here() -> str | None:
    return missing("ctranslate2", "speech")


def runner(layout: Layout, folder: Path):
    return CT2Whisper(folder)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    return CT2Whisper(folder, packed=False), None


class CT2Whisper(WhisperRunner):
    def __init__(self, path: Path, packed: bool = True):
        """`packed=False`: the weights left as the file holds them. On Intel CPUs CTranslate2 (from 4.8) packs every
        linear weight for MKL's GEMM as it loads, and keeps each unpacked one until the last is packed: twice the
        weights at once (large-v3-turbo int8: 1.6 GB for its 0.8 GB file). The same int8 GEMM runs either way, so
        parity, which needs the transcripts and not the speed, loads them unpacked; the bench packs them as an app
        does. CTranslate2 reads the switch once, at a process's first model."""
        import ctranslate2

        ct2_config = json.loads((path / "config.json").read_text())
        vocabulary = json.loads((path / "vocabulary.json").read_text())
        super().__init__(
            path,
            config={
                "vocab_size": len(vocabulary),
                "suppress_tokens": ct2_config.get("suppress_ids", []),
                "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", []),
            },
        )
        self.ct2 = ctranslate2
        ctranslate2.set_log_level(logging.ERROR)  # not the notice that float16 scales compute in float32 on a CPU
        if not packed:
            os.environ["CT2_PACKED_GEMM"] = "0"
        self.model = ctranslate2.models.Whisper(str(path), device="cpu")
        unpacked = "" if packed else ", weights unpacked"
        self.engine = f"CTranslate2 {ctranslate2.__version__} (CPU, {self.model.compute_type}{unpacked})"
        if not self.model.is_multilingual:  # CTranslate2's own reading of the model decides what it can detect
            self.multilingual, self.languages = False, {}
            self.use_language(None)

    def encode(self, mel: np.ndarray):
        return self.model.encode(self.ct2.StorageView.from_array(np.ascontiguousarray(mel)))

    def detect_language(self, encoded) -> str:
        """CTranslate2's own detection: the same single decoder step from <|startoftranscript|>."""
        (ranked,) = self.model.detect_language(encoded)
        return ranked[0][0][2:-2]

    def decode(self, encoded) -> list[int]:
        result = self.model.generate(
            encoded,
            [self.prompt_for(encoded)],
            beam_size=1,
            max_length=self.max_tokens,
            suppress_blank=True,  # the begin_suppress tokens, as the shared loop suppresses them
            suppress_tokens=[-1],  # the model's suppress_ids
        )
        return [t for t in result[0].sequences_ids[0] if t != self.eot]
