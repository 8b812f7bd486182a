"""The transcription workload: audio through an engine's Whisper loop, the median of several runs after a warm-up;
real-time factor (wall / audio), encoder and decoder time per 30 s window, peak memory, and WER against a
reference after Whisper's English normalization.
"""

import statistics
import time
from pathlib import Path

import numpy as np

from edgeport import report
from edgeport.audio import SAMPLE_RATE, load_audio, parity_clips
from edgeport.engines import engine_of, mlx, onnx
from edgeport.engines.whisper import transcribe
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout
from edgeport.machine import machine, peak_rss_bytes
from edgeport.manifest import ArtifactEntry
from edgeport.parity import wer
from edgeport.runtime import BenchOptions
from edgeport.runtime.results import BenchResult, Transcription
from edgeport.texts import read_text

WARMUP_S = 5.0  # the warm-up run transcribes this much of the audio
RUNS = 3


def bench_artifact(out: Path, artifact: ArtifactEntry, layout: Layout, options: BenchOptions) -> BenchResult:
    """`edgeport bench` on a Whisper artifact: --audio (or the 44 s reading the parity speech comes from)
    transcribed, with WER against its transcript when there is one."""
    if options.text or options.prompt_tokens or options.max_tokens:
        raise EdgeportError("--text, --prompt-tokens and --max-tokens are for causal LMs; Whisper takes --audio")
    if options.audio:
        speech = load_audio(options.audio)
        spoken = read_text(options.reference) if options.reference else None
    elif options.reference:
        raise EdgeportError("--reference needs the --audio it transcribes")
    else:
        clip = parity_clips()[0]
        speech, spoken = clip.audio, clip.reference
    with report.step(f"Loading {artifact.format} {artifact.quantization}"):
        runner = engine_of(layout).runner(layout, out / artifact.path)
        runner.use_language(options.language, options.task)
    with report.step("Transcription bench") as progress:
        result = bench(runner, speech, spoken, options.runs or RUNS, progress)
    result.audio = str(options.audio) if options.audio else "two_cities.wav (moonshine-voice)"
    if layout.engine == "mlx" and mlx.slow_here():
        result.note = "MLX's CPU backend in float32, not Metal: these are not Mac figures"
    result.note = onnx.not_npu_figures(layout, runner) or result.note
    return result


def bench(runner, audio: np.ndarray, reference: str | None, runs: int, progress=None) -> BenchResult:
    """Real-time factor, encoder and decoder time per window and peak memory of `runner` on `audio`: the median
    of `runs` runs after a warm-up on its first seconds; WER when `reference` is given."""
    transcribe(runner, audio[: int(WARMUP_S * SAMPLE_RATE)])  # loads and compiles the kernels; not counted
    samples = []
    for i in range(1, runs + 1):
        if progress:
            progress(f"run {i}/{runs}")
        samples.append(transcribe(runner, audio))
    median = sorted(samples, key=lambda t: t.wall_s)[len(samples) // 2]
    result = Transcription(
        audio_s=round(median.audio_s, 3),
        wall_s=round(median.wall_s, 4),
        rtf=round(median.wall_s / median.audio_s, 5),
        windows=len(median.encode_s),
        encode_s_per_window=round(statistics.mean(median.encode_s), 4),
        decode_s_per_window=round(statistics.mean(median.decode_s), 4),
        tokens=sum(median.tokens),
        peak_rss_gb=round(peak_rss_bytes() / 1e9, 4),
        language=runner.language
        or (max(set(median.languages), key=median.languages.count) if median.languages else "en"),
        detected_languages=median.languages,
        task=runner.task,
        text=median.text,
        wer=round(wer(reference, median.text), 4) if reference is not None else None,
    )
    return BenchResult(
        workload="transcribe",
        engine=runner.engine,
        machine=machine(),
        runs=runs,
        results=[result],
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
