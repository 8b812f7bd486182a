"""The summarization workload: the chat template asking for a summary of real text at set prompt lengths.

Reports time to first token, prefill and decode tokens/s and peak memory, each the median of the runs
after a short warm-up run.
"""

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from edgeport.errors import EdgeportError
from edgeport.texts import chat_ids

INSTRUCTION = "Summarize the following text in a few sentences.\n\n"
WARMUP_TOKENS = 16  # a short warm-up run exercises the prefill and decode kernels before the measured runs


@dataclass
class Measurement:
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


def bench(runner, text: str, prompt_lengths: list[int], max_tokens: int, runs: int, progress=None) -> dict:
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
    return {
        "workload": "summarize",
        "engine": runner.engine,
        "machine": machine(),
        "max_tokens": max_tokens,
        "runs": runs,
        "results": [asdict(r) for r in results],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summary_prompt(tokenizer, text: str, length: int) -> list[int]:
    """Token ids of a summary request of exactly `length` tokens: the chat template around the instruction and as
    much of `text` as fits (repeated when it is short), cut at a token rather than a word."""
    longer = chat_ids(tokenizer, summary_request(tokenizer, text, length, over=True))
    empty = chat_ids(tokenizer, "")  # the template alone: the tokens before and after the user's message
    before = _common_prefix(longer, empty)
    after = min(_common_prefix(longer[::-1], empty[before:][::-1]), len(longer) - before)
    room = length - before - after
    if room < 1:
        raise EdgeportError(f"a {length}-token prompt cannot hold the chat template and the instruction")
    return longer[:before] + longer[before : len(longer) - after][:room] + longer[len(longer) - after :]


def summary_request(tokenizer, text: str, length: int, over: bool = False) -> str:
    """The user's message: the instruction and the longest prefix of `text` (repeated when it is short) that keeps
    the chat prompt within `length` tokens; with `over`, the shortest that passes it."""
    words = text.split()
    if not words:
        raise EdgeportError("the text to summarize is empty")

    def request(n: int) -> str:
        return INSTRUCTION + " ".join(words[:n])

    if len(chat_ids(tokenizer, request(1))) > length:
        raise EdgeportError(f"a {length}-token prompt cannot hold the summary instruction; use a longer one")
    while len(chat_ids(tokenizer, request(len(words)))) <= length:
        words = words + words
    low, high = 1, len(words)
    while low < high:  # binary search on the number of words
        mid = (low + high + 1) // 2
        if len(chat_ids(tokenizer, request(mid))) <= length:
            low = mid
        else:
            high = mid - 1
    return request(low + 1 if over else low)


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


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


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def machine() -> dict:
    """What the figures were measured on, so `check` knows whether they speak for a target."""
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu_name(), "node": platform.node()}


def cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        return subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


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
