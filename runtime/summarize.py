"""The summarization workload: the chat template asking for a summary of real text at set prompt lengths.

Reports time to first token, prefill and decode tokens/s and peak memory, each the median of the runs
after a short warm-up run.
"""

import statistics
import time
from pathlib import Path

from edgeport import report
from edgeport.engines import engine_of, mlx, onnx
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout
from edgeport.machine import machine, peak_rss_bytes
from edgeport.manifest import ArtifactEntry
from edgeport.runtime import BenchOptions
from edgeport.runtime.results import BenchResult, Measurement
from edgeport.texts import default_article, read_text, summary_prompt

WARMUP_TOKENS = 16  # a short warm-up run exercises the prefill and decode kernels before the measured runs
# MLX's CPU build runs quantized matmuls at well under a token per second (shared/TOOLCHAIN.md): off a Mac the
# default workload is cut to what finishes in minutes, and the bench says so.
FULL_WORKLOAD = {"prompt_tokens": [512, 2048], "max_tokens": 128, "runs": 3}
SLOW_ENGINE_WORKLOAD = {"prompt_tokens": [48], "max_tokens": 4, "runs": 1}


def bench_artifact(out: Path, artifact: ArtifactEntry, layout: Layout, options: BenchOptions) -> BenchResult:
    """`edgeport bench` on a causal LM artifact: the summary workload at each prompt length, cut to the model's
    context and, where the engine runs slowly here, to what finishes in minutes."""
    if options.audio or options.reference:
        raise EdgeportError(f"--audio and --reference are for Whisper outputs; {out} holds a causal LM")
    slow = layout.engine == "mlx" and mlx.slow_here()
    workload = SLOW_ENGINE_WORKLOAD if slow else FULL_WORKLOAD
    lengths = options.prompt_tokens or workload["prompt_tokens"]
    new_tokens = options.max_tokens or workload["max_tokens"]
    notes = []
    folder = out / artifact.path
    context = context_length(folder)
    if context and max(lengths) + new_tokens > context:
        lengths = sorted({min(n, context - new_tokens) for n in lengths})
        if lengths[0] < 1:
            raise EdgeportError(f"--max-tokens {new_tokens} leaves no room for a prompt in the {context}-token context")
        notes.append(f"prompts cut to {', '.join(map(str, lengths))} tokens: the model's context holds {context}")
    with report.step(f"Loading {artifact.format} {artifact.quantization}"):
        runner = engine_of(layout).runner(layout, folder)
    with report.step("Summarization bench") as progress:
        text = read_text(options.text) if options.text else default_article()
        result = bench(runner, text, lengths, new_tokens, options.runs or workload["runs"], progress)
    if slow and not (options.prompt_tokens and options.max_tokens and options.runs):
        notes.append(f"workload cut for {slow}; a Mac runs 512,2048 prompt tokens, 128 new tokens, 3 runs")
    notes.append(onnx.not_npu_figures(layout, runner))
    result.note = "; ".join(note for note in notes if note) or None
    return result


def context_length(folder: Path) -> int | None:
    """The most tokens the model attends to, from the config.json beside the artifact (None when it has none)."""
    from edgeport.config import check as check_config
    from edgeport.families.causal_lm import text_config
    from edgeport.files import read_json

    file = folder / "config.json"
    if not file.is_file():
        return None
    config = check_config(read_json(file, ""), file)
    return text_config(config).get("max_position_embeddings")


def bench(runner, text: str, prompt_lengths: list[int], max_tokens: int, runs: int, progress=None) -> BenchResult:
    """Measure `runner` on a summary prompt of each length; `progress(message)` is told of each run."""
    results = []
    for length in prompt_lengths:
        prompt = summary_prompt(runner.tokenizer, text, length)
        if progress:
            progress(f"{len(prompt)}-token prompt: warm-up")
        run_once(runner, prompt[:WARMUP_TOKENS], 2)  # loads and compiles the kernels; not counted
        samples = []
        for i in range(1, runs + 1):
            if progress:
                progress(f"{len(prompt)}-token prompt: run {i}/{runs}")
            samples.append(run_once(runner, prompt, max_tokens))
        results.append(_median(samples))
    return BenchResult(
        workload="summarize",
        engine=runner.engine,
        machine=machine(),
        runs=runs,
        results=results,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        max_tokens=max_tokens,
    )


def run_once(runner, prompt: list[int], max_tokens: int) -> Measurement:
    first = last = None
    for token in runner.generate(prompt, max_tokens):
        first = first or token
        last = token
    if last is None:
        raise EdgeportError("the model produced no token")
    return Measurement(
        prompt_tokens=last.prompt_tokens,
        new_tokens=last.generated,
        ttft_s=round(first.elapsed_s, 4),
        prefill_tps=round(last.prompt_tps, 2),
        decode_tps=round(last.generation_tps, 2),
        peak_memory_gb=round(last.peak_memory_gb, 4),
        peak_rss_gb=round(peak_rss_bytes() / 1e9, 4),
    )


def _median(samples: list[Measurement]) -> Measurement:
    """The median of each figure, with the mean and standard deviation of the speeds beside it."""

    def median(name: str) -> float:
        return statistics.median(getattr(s, name) for s in samples)

    def spread(name: str) -> tuple[float, float]:
        values = [getattr(s, name) for s in samples]
        return round(statistics.mean(values), 4), round(statistics.stdev(values) if len(values) > 1 else 0.0, 4)

    return Measurement(
        prompt_tokens=samples[0].prompt_tokens,
        new_tokens=int(median("new_tokens")),
        ttft_s=median("ttft_s"),
        prefill_tps=median("prefill_tps"),
        decode_tps=median("decode_tps"),
        peak_memory_gb=median("peak_memory_gb"),
        peak_rss_gb=median("peak_rss_gb"),
        ttft_s_mean_std=spread("ttft_s"),
        prefill_tps_mean_std=spread("prefill_tps"),
        decode_tps_mean_std=spread("decode_tps"),
    )
