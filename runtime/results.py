"""What `edgeport bench` measured, as bench.json holds it and `check` reads it back: one typed result per run of
a workload (a prompt length summarized, an audio file transcribed), and the bench around them."""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgeport.errors import EdgeportError


@dataclass
class Measurement:
    """One prompt length summarized: the median of the runs, with their spread."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float  # as the engine reports it
    peak_rss_gb: float  # the process's peak resident memory, as the OS sees it
    # (mean, standard deviation) over the runs, beside the medians above, as llama-bench reports them
    ttft_s_mean_std: tuple[float, float] = (0.0, 0.0)
    prefill_tps_mean_std: tuple[float, float] = (0.0, 0.0)
    decode_tps_mean_std: tuple[float, float] = (0.0, 0.0)

    @property
    def peak_gb(self) -> float:
        return max(self.peak_memory_gb, self.peak_rss_gb)


@dataclass
class Transcription:
    """One audio file transcribed: the median run."""

    audio_s: float
    wall_s: float
    rtf: float
    windows: int
    encode_s_per_window: float
    decode_s_per_window: float
    tokens: int
    peak_rss_gb: float
    language: str
    detected_languages: list[str]  # per window, where the language was detected
    task: str
    text: str
    wer: float | None = None  # when a reference transcript was given

    @property
    def peak_gb(self) -> float:
        return self.peak_rss_gb


RESULTS = {"summarize": Measurement, "transcribe": Transcription}  # workload -> what one of its results holds


@dataclass
class BenchResult:
    workload: str  # "summarize" | "transcribe"
    engine: str
    machine: dict  # what it ran on: system, arch, cpu, node
    runs: int
    results: list  # of RESULTS[workload]
    measured_at: str
    max_tokens: int | None = None  # summarize: new tokens per run
    format: str | None = None
    quantization: str | None = None
    artifact: str | None = None  # the artifact's folder in the output
    audio: str | None = None  # transcribe: what was transcribed
    note: str | None = None  # why these figures are not what the target would show
    raced: list | None = None  # host: every CPU artifact measured, {format, quantization, decode_tps}, fastest first

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["results"] = [{k: v for k, v in r.items() if v is not None} for r in data["results"]]
        return data

    @classmethod
    def from_dict(cls, data, where: Path) -> "BenchResult":
        """A bench.json read back, each field checked to be there (a file from another version is refused)."""
        try:
            kind = RESULTS[data["workload"]]
            results = [kind(**{f.name: r[f.name] for f in fields(kind) if f.name in r}) for r in data["results"]]
            known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            result = cls(**{**known, "results": results})
            if not isinstance(result.machine, dict):
                raise TypeError("machine is not an object")
            for r in results:
                for f in fields(r):
                    value = getattr(r, f.name)
                    if f.type in (float, int) and (not isinstance(value, int | float) or isinstance(value, bool)):
                        raise TypeError(f"{f.name} is {value!r}, not a number")
            return result
        except (KeyError, TypeError, AttributeError) as e:
            raise EdgeportError(
                f"{where}: not a bench result this edgeport wrote ({type(e).__name__}: {str(e)[:80]}); "
                f"run `edgeport bench {where.parent}` again"
            ) from e
