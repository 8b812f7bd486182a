"""Bench results vs a target's budget: each budget line met, missed, or not checked (and why)."""

from dataclasses import asdict, dataclass

from edgeport.errors import MET, MISSED, NOT_CHECKED
from edgeport.parity import Metric
from edgeport.runtime.results import BenchResult
from edgeport.targets import Target


@dataclass
class Line:
    budget: str  # what is judged: "time to first token", "decode", "peak memory", "real-time factor", "WER"
    limit: float
    unit: str  # "s", "tok/s", "GB", or "" for ratios
    at_most: bool  # the measured figure must be at most the limit (else at least)
    measured: float | None  # None when not measured
    status: str  # "met" | "missed" | "not checked"
    reason: str = ""
    condition: str = ""  # where the limit applies, e.g. "at 512 prompt tokens"

    @property
    def limit_text(self) -> str:
        return " ".join(p for p in ("≤" if self.at_most else "≥", f"{self.limit:g}", self.unit, self.condition) if p)

    @property
    def measured_text(self) -> str:
        return "—" if self.measured is None else f"{self.measured:.4g} {self.unit}".strip()


def check(bench: BenchResult, target: Target, host_machine: dict) -> list[Line]:
    """Judge `bench` (an `edgeport bench` result) against `target`'s budget."""
    lines = WORKLOAD_LINES[bench.workload](bench.results, target.budget)
    peak = max(r.peak_gb for r in bench.results)
    lines.append(_judged("peak memory", target.peak_memory_budget_gb, "GB", True, peak))
    elsewhere = _measured_elsewhere(bench.machine, target, host_machine)
    if elsewhere:
        for line in lines:
            if line.status != "not checked":
                line.status, line.reason = "not checked", elsewhere
    return lines


def _summarization_lines(results: list, budget) -> list[Line]:
    lines = []
    if budget.ttft_s:
        condition = f"at {budget.prompt_tokens} prompt tokens"
        at_length = [r for r in results if r.prompt_tokens == budget.prompt_tokens]
        if at_length:
            lines.append(_judged("time to first token", budget.ttft_s, "s", True, at_length[0].ttft_s, condition))
        else:
            measured = ", ".join(str(r.prompt_tokens) for r in results)
            reason = f"bench measured {measured} prompt tokens; bench with --prompt-tokens {budget.prompt_tokens}"
            lines.append(Line("time to first token", budget.ttft_s, "s", True, None, "not checked", reason, condition))
    if budget.decode_tps:
        decode = min(r.decode_tps for r in results)
        lines.append(_judged("decode", budget.decode_tps, "tok/s", False, decode))
    return lines


def _transcription_lines(results: list, budget) -> list[Line]:
    lines, result = [], results[0]
    if budget.rtf:
        lines.append(_judged("real-time factor", budget.rtf, "", True, result.rtf))
    if budget.wer:
        if result.wer is not None:
            lines.append(_judged("WER", budget.wer, "", True, result.wer))
        else:
            reason = "bench with --audio and its --reference"
            lines.append(Line("WER", budget.wer, "", True, None, "not checked", reason))
    return lines


WORKLOAD_LINES = {"summarize": _summarization_lines, "transcribe": _transcription_lines}  # the budget each judges


def verdict(lines: list[Line]) -> int:
    """The exit code: MISSED if any line was missed, else NOT_CHECKED if any could not be judged, else MET."""
    statuses = {line.status for line in lines}
    return MISSED if "missed" in statuses else NOT_CHECKED if "not checked" in statuses or not lines else MET


def passed(lines: list[Line]) -> bool:
    """Met means every budget line was measured and met."""
    return bool(lines) and all(line.status == "met" for line in lines)


def to_dicts(lines: list[Line]) -> list[dict]:
    return [asdict(line) for line in lines]


def _judged(name: str, limit: float, unit: str, at_most: bool, measured: float, condition: str = "") -> Line:
    met = Metric(name, measured, limit, at_least=not at_most).ok
    return Line(name, limit, unit, at_most, measured, "met" if met else "missed", condition=condition)


def _measured_elsewhere(measured_on: dict, target: Target, host_machine: dict) -> str:
    """Why these figures cannot speak for `target`, or "" when they can."""
    if target.name == "host":
        same = all(measured_on.get(k) == host_machine.get(k) for k in ("system", "arch", "cpu", "node"))
        return "" if same else f"measured on {measured_on.get('node')} ({measured_on.get('cpu')}), not this machine"
    return (
        f"measured on {measured_on.get('cpu') or measured_on.get('arch')}, not on a {target.description}; "
        f"bench on that device, or check against --target host"
    )
