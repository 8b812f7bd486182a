"""Bench results vs a target's budget: each budget line met, missed, or not checked (and why)."""

from dataclasses import asdict, dataclass

from edgeport.targets import Target


@dataclass
class Line:
    budget: str
    limit: str
    measured: str
    status: str  # "met" | "missed" | "not checked"
    reason: str = ""


def check(bench: dict, target: Target, host_machine: dict) -> list[Line]:
    """Judge `bench` (an `edgeport bench` result) against `target`'s budget."""
    results = bench["results"]
    if bench.get("workload") == "transcribe":
        lines = _transcription_lines(results[0], target.budget)
    else:
        lines = _summarization_lines(results, target.budget)
    peak = max(max(r.get("peak_memory_gb", 0), r["peak_rss_gb"]) for r in results)
    limit = target.peak_memory_budget_gb
    lines.append(_line("peak memory", f"≤ {limit:.1f} GB", f"{peak:.2f} GB", peak <= limit))
    elsewhere = _measured_elsewhere(bench["machine"], target, host_machine)
    if elsewhere:
        for line in lines:
            if line.status != "not checked":
                line.status, line.reason = "not checked", elsewhere
    return lines


def _summarization_lines(results: list[dict], budget) -> list[Line]:
    lines = []
    if budget.ttft_s:
        limit = f"≤ {budget.ttft_s:g} s at {budget.prompt_tokens} tokens"
        at_budget_length = [r for r in results if r["prompt_tokens"] >= budget.prompt_tokens]
        if at_budget_length:
            ttft = min(at_budget_length, key=lambda r: r["prompt_tokens"])["ttft_s"]
            lines.append(_line("time to first token", limit, f"{ttft:.2f} s", ttft <= budget.ttft_s))
        else:
            longest = max(r["prompt_tokens"] for r in results)
            reason = f"longest bench prompt was {longest} tokens; bench with --prompt-tokens {budget.prompt_tokens}"
            lines.append(Line("time to first token", limit, "—", "not checked", reason))
    if budget.decode_tps:
        decode = min(r["decode_tps"] for r in results)
        lines.append(
            _line("decode", f"≥ {budget.decode_tps:g} tok/s", f"{decode:.1f} tok/s", decode >= budget.decode_tps)
        )
    return lines


def _transcription_lines(result: dict, budget) -> list[Line]:
    lines = []
    if budget.rtf:
        rtf = result["rtf"]
        lines.append(_line("real-time factor", f"≤ {budget.rtf:g}", f"{rtf:.4f}", rtf <= budget.rtf))
    if budget.wer:
        if "wer" in result:
            lines.append(_line("WER", f"≤ {budget.wer:g}", f"{result['wer']:.3f}", result["wer"] <= budget.wer))
        else:
            lines.append(Line("WER", f"≤ {budget.wer:g}", "—", "not checked", "bench with --audio and its --reference"))
    return lines


def passed(lines: list[Line]) -> bool:
    """Met means every budget line was measured and met."""
    return bool(lines) and all(line.status == "met" for line in lines)


def to_dicts(lines: list[Line]) -> list[dict]:
    return [asdict(line) for line in lines]


def _line(name: str, limit: str, shown: str, ok: bool) -> Line:
    return Line(name, limit, shown, "met" if ok else "missed")


def _measured_elsewhere(measured_on: dict, target: Target, host_machine: dict) -> str:
    """Why these figures cannot speak for `target`, or "" when they can."""
    if target.name == "host":
        same = all(measured_on.get(k) == host_machine.get(k) for k in ("system", "arch", "cpu", "node"))
        return "" if same else f"measured on {measured_on.get('node')} ({measured_on.get('cpu')}), not this machine"
    return (
        f"measured on {measured_on.get('cpu') or measured_on.get('arch')}, not on a {target.description}; "
        f"bench on that device, or check against --target host"
    )
