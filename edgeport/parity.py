"""Artifact vs source on the same inputs. Causal LMs: top-1 agreement, KL divergence, logits cosine and perplexity
delta on the same tokens. Whisper: WER of source and artifact on the same speech, the delta, and the share of
clips where the artifact did no worse (the measure WhisperKit publishes)."""

from dataclasses import asdict, dataclass, field

import numpy as np

from edgeport.audio import SAMPLE_RATE
from edgeport.quantization import lookup
from edgeport.texts import chat_ids, reference_paragraph

# Chat prompts every causal LM is checked on, with the perplexity text below.
PROMPTS = (
    "Summarize in one sentence: the meeting moved the product launch from March to May because testing found "
    "a memory leak in the audio pipeline.",
    "Write three short bullet points on why a laptop battery drains faster in cold weather.",
    "What is the capital of France, and what river runs through it?",
)


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
LM_METRICS = ("top1_agreement", "kl_mean", "ppl_delta")


@dataclass
class Parity:
    status: str  # "passed" | "failed" | "not checked"
    method: str  # what ran on each side
    bounds: dict
    metrics: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)  # what this platform could not run
    seconds: float = 0.0  # wall time of the check, the source's reference run included

    def to_dict(self) -> dict:
        return asdict(self)


class Reference:
    """The source's logits for the parity inputs, computed once and shared by every artifact."""

    def __init__(self, source, runner):
        tokenizer = source.load_tokenizer()
        self.inputs = [chat_ids(tokenizer, p) for p in PROMPTS]
        self.text = tokenizer(reference_paragraph())["input_ids"]
        self.engine = runner.engine
        self.logits = [runner.logits(ids) for ids in self.inputs]
        self.text_logits = runner.logits(self.text)


def measure(reference: Reference, runner, quantization: str, not_checked: str | None = None) -> Parity:
    """Compare `runner` (one artifact) with the reference on the same tokens."""
    artifact_logits = [runner.logits(ids) for ids in reference.inputs]
    ref = np.concatenate(reference.logits)
    art = np.concatenate(artifact_logits)
    ppl_source = perplexity(reference.text_logits, reference.text)
    ppl_artifact = perplexity(runner.logits(reference.text), reference.text)
    metrics = {
        "tokens": int(ref.shape[0]),
        "top1_agreement": round(float(np.mean(ref.argmax(-1) == art.argmax(-1))), 4),
        "kl_mean": round(float(np.mean(kl_divergence(ref, art))), 5),
        "cosine_mean": round(float(np.mean(cosine(ref, art))), 5),
        "ppl_source": round(ppl_source, 3),
        "ppl_artifact": round(ppl_artifact, 3),
        "ppl_delta": round((ppl_artifact - ppl_source) / ppl_source, 4),
    }
    bounds = {name: getattr(BOUNDS[lookup(quantization).bounds_key], name) for name in LM_METRICS}
    return _judged(metrics, bounds, f"source: {reference.engine}; artifact: {runner.engine}", not_checked)


PARITY_LANGUAGE = "en"  # the parity clips are English readings: no detection stands between the two transcripts


class SpeechReference:
    """The source's transcripts of the parity clips, made once and shared by every artifact."""

    def __init__(self, runner, clips):
        from edgeport.runtime.transcribe import transcribe

        self.clips, self.engine = clips, runner.engine
        runner.use_language(PARITY_LANGUAGE)
        self.transcripts = [transcribe(runner, clip.audio).text for clip in clips]


def measure_speech(reference: SpeechReference, runner, quantization: str, not_checked: str | None = None) -> Parity:
    """Transcribe the parity clips with `runner` (one artifact) and compare its WER with the source's."""
    from edgeport.runtime.transcribe import transcribe, wer

    clips = reference.clips
    runner.use_language(PARITY_LANGUAGE)
    texts = [transcribe(runner, clip.audio).text for clip in clips]
    spoken = [clip.reference for clip in clips]
    source_wer, artifact_wer = wer(spoken, reference.transcripts), wer(spoken, texts)
    no_worse = [
        wer(clip.reference, text) <= wer(clip.reference, source)
        for clip, text, source in zip(clips, texts, reference.transcripts, strict=True)
    ]
    metrics = {
        "clips": [clip.name for clip in clips],
        "audio_s": round(sum(len(clip.audio) for clip in clips) / SAMPLE_RATE, 2),
        "wer_source": round(source_wer, 4),
        "wer_artifact": round(artifact_wer, 4),
        "wer_delta": round(artifact_wer - source_wer, 4),
        "no_regression_share": round(sum(no_worse) / len(clips), 3),
        "transcripts": texts,
        "source_transcripts": reference.transcripts,
    }
    bounds = {"wer_delta": BOUNDS[lookup(quantization).bounds_key].wer_delta}
    return _judged(metrics, bounds, f"source: {reference.engine}; artifact: {runner.engine}", not_checked)


def _judged(metrics: dict, bounds: dict, method: str, not_checked: str | None) -> Parity:
    """Every metric named in `bounds` on its right side: top-1 agreement at least, the others at most."""
    failures = [
        f"{name} {metrics[name]} {'<' if name == 'top1_agreement' else '>'} {limit}"
        for name, limit in bounds.items()
        if (metrics[name] < limit if name == "top1_agreement" else metrics[name] > limit)
    ]
    return Parity(
        status="failed" if failures else "passed",
        method=method,
        bounds=bounds,
        metrics=metrics,
        failures=failures,
        not_checked=[not_checked] if not_checked else [],
    )


def kl_divergence(ref_logits: np.ndarray, art_logits: np.ndarray) -> np.ndarray:
    """KL(source || artifact) per position, in nats."""
    log_p = log_softmax(ref_logits)
    log_q = log_softmax(art_logits)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each next token."""
    log_probs = log_softmax(logits[:-1])
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
