"""The runtime: an output's artifact measured on the machine at hand (`summarize`, `transcribe`: the workload of
each model family), the figures as typed results (`results`), and judged against a target's budget (`check`)."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchOptions:
    """What `edgeport bench` was asked; each workload takes its own and refuses the other's."""

    text: Path | None = None  # summarize: the text to summarize
    prompt_tokens: list[int] | None = None
    max_tokens: int | None = None
    audio: Path | None = None  # transcribe: the speech, and its transcript for WER
    reference: Path | None = None
    language: str | None = None
    task: str = "transcribe"
    runs: int | None = None
