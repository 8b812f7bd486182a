"""Artifact vs source: the bounds each quantization is held to, one judge of a metric against its bound, and the
measures the families compute their metrics with (KL divergence, cosine, perplexity, WER). What a family compares
(logits on chat prompts, transcripts of speech) is the family's own (edgeport.families)."""

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeport.errors import EdgeportError
from edgeport.quantization import lookup


@dataclass(frozen=True)
class Bounds:
    """An artifact passes when every metric is on the right side of its bound."""

    top1_agreement: float  # at least
    kl_mean: float  # at most, nats per token
    ppl_delta: float  # at most, relative perplexity increase over the source
    wer_delta: float  # at most, Whisper: WER increase over the source on the parity clips (absolute)


# One table for every quantization; a quantized artifact is judged against the float source it came from.
# The bounds separate a broken conversion (top-1 near 0, KL of several nats) from the loss a quantization
# really costs. They are set so that small models, which lose the most, pass at an honest setting: SmolLM2-135M
# (itself dequantized from Q4_1) measures q8 0.97 / 0.003 / -0.1 % and q4 0.57 / 0.96 / +49 %
# (top-1 / KL / perplexity delta); larger models land well inside. See the README's parity section.
# The WER bound is absolute: on the 2 parity clips (about 140 words) one word more wrong is +0.007.
BOUNDS: dict[str, Bounds] = {
    "fp16": Bounds(0.98, 0.005, 0.01, 0.01),
    "fp32": Bounds(0.98, 0.005, 0.01, 0.01),
    "bf16": Bounds(0.95, 0.02, 0.03, 0.01),
    "q8": Bounds(0.93, 0.03, 0.03, 0.02),
    "int8": Bounds(0.93, 0.03, 0.03, 0.02),
    "int8-channel": Bounds(0.93, 0.03, 0.03, 0.02),
    "q6": Bounds(0.85, 0.10, 0.08, 0.03),
    "q5": Bounds(0.70, 0.50, 0.30, 0.05),
    "mixed_4_6": Bounds(0.70, 0.50, 0.30, 0.05),
    "w8a16": Bounds(0.70, 0.50, 0.30, 0.05),  # one 8-bit scale per output channel, as QNN runs it: see the README
    "q4": Bounds(0.50, 1.20, 0.60, 0.10),
    "int4-block32": Bounds(0.50, 1.20, 0.60, 0.10),
    "palettize4": Bounds(0.50, 1.20, 0.60, 0.10),
    "w4a16": Bounds(0.50, 1.20, 0.60, 0.10),
    "mixed_3_6": Bounds(0.45, 1.50, 0.80, 0.15),
    "mixed_3_4": Bounds(0.40, 2.00, 1.00, 0.20),
    "q3": Bounds(0.35, 2.50, 1.50, 0.30),
    "mixed_2_6": Bounds(0.25, 4.00, 3.00, 0.50),
    "q2": Bounds(0.15, 6.00, 5.00, 0.80),
}


def bounds_for(quantization: str) -> Bounds:
    """The bounds an artifact at `quantization` is judged by (grouped variants as their base quantization)."""
    return BOUNDS[lookup(quantization).bounds_key]


@dataclass(frozen=True)
class Metric:
    """One measured figure against its bound."""

    name: str
    value: float | None
    bound: float
    at_least: bool = False  # the value must be at least the bound (else at most)

    @property
    def ok(self) -> bool:
        """On the right side of the bound; a figure that could not be computed (NaN, None) is not."""
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    @property
    def failure(self) -> str:
        return f"{self.name} {self.value} {'<' if self.at_least else '>'} {self.bound}"


@dataclass
class Parity:
    status: str  # "passed" | "failed" | "not checked"
    method: str  # what ran on each side
    bounds: dict
    metrics: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)  # what this platform could not run
    seconds: float = 0.0  # wall time of the check against the stored reference

    def to_dict(self) -> dict:
        return asdict(self)


def judge(metrics: dict, judged: list[Metric], method: str, not_checked: str | None = None) -> Parity:
    """Parity from every metric of `metrics` and the ones of them `judged` against their bounds."""
    failures = [m.failure for m in judged if not m.ok]
    return Parity(
        status="failed" if failures else "passed",
        method=method,
        bounds={m.name: m.bound for m in judged},
        metrics=metrics,
        failures=failures,
        not_checked=[not_checked] if not_checked else [],
    )


def skipped(reason: str) -> Parity:
    """Parity that did not run, and says why (never passed)."""
    return Parity(status="not checked", method="not run", bounds={}, not_checked=[reason])


ROWS = 16  # logits rows measured at a time: a row of a 128k vocabulary is 1 MB in float64


def by_rows(measure, *arrays: np.ndarray) -> np.ndarray:
    """`measure` of each row of `arrays` (one value per row), a few rows at a time: the float64 copies of whole
    [tokens, vocab] logits would cost the parity run half a gigabyte beside the artifact at a 128k vocabulary."""
    return np.concatenate([measure(*(a[i : i + ROWS] for a in arrays)) for i in range(0, len(arrays[0]), ROWS)])


def kl_divergence(ref_logits: np.ndarray, art_logits: np.ndarray) -> np.ndarray:
    """KL(source || artifact) per position, in nats."""

    def kl(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
        log_p, log_q = log_softmax(ref), log_softmax(art)
        return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)

    return by_rows(kl, ref_logits, art_logits)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.astype(np.float64), b.astype(np.float64)
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    return by_rows(cos, a, b)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each next token."""

    def nll(rows: np.ndarray, following: np.ndarray) -> np.ndarray:
        return -np.take_along_axis(log_softmax(rows), following[:, None], -1)[:, 0]

    return float(np.exp(by_rows(nll, logits[:-1], np.asarray(ids[1:])).mean()))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def normalize(text: str) -> str:
    """Whisper's English normalization (numbers, spellings, punctuation, case), as WER is published."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})(text)


def wer(reference: str | list[str], hypothesis: str | list[str]) -> float:
    """Word error rate after normalization; lists are scored as one corpus (errors over all reference words)."""
    import jiwer

    references = [normalize(r) for r in ([reference] if isinstance(reference, str) else reference)]
    hypotheses = [normalize(h) for h in ([hypothesis] if isinstance(hypothesis, str) else hypothesis)]
    if not all(references):
        raise EdgeportError("a reference transcript is empty after normalization")
    return float(jiwer.wer(references, hypotheses))
