from pathlib import Path

from edgeport import targets
from edgeport.machine import machine
from edgeport.runtime.check import check, passed
from edgeport.runtime.results import BenchResult


def bench(prompt_tokens=512, ttft=1.0, decode=30.0, peak=0.5, on=None):
    result = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": 16,
        "ttft_s": ttft,
        "prefill_tps": 500.0,
        "decode_tps": decode,
        "peak_memory_gb": peak,
        "peak_rss_gb": 0.2,
    }
    data = {"workload": "summarize", "engine": "e", "runs": 1, "measured_at": "", "machine": on or machine()}
    return BenchResult.from_dict({**data, "results": [result]}, Path("bench.json"))


def statuses(lines):
    return {line.budget: line.status for line in lines}


def test_host_budget_met_and_missed():
    host = targets.load("host")
    lines = check(bench(), host, machine())
    assert passed(lines) and set(statuses(lines).values()) == {"met"}
    slow = check(bench(decode=1.0, ttft=60.0), host, machine())
    assert statuses(slow) == {"time to first token": "missed", "decode": "missed", "peak memory": "met"}
    assert not passed(slow)


def test_a_short_bench_cannot_vouch_for_the_ttft_budget():
    lines = check(bench(prompt_tokens=48), targets.load("host"), machine())
    ttft = next(line for line in lines if line.budget == "time to first token")
    assert ttft.status == "not checked" and "--prompt-tokens 512" in ttft.reason
    assert not passed(lines)


def test_figures_from_another_machine_are_not_checked_against_a_device():
    lines = check(bench(), targets.load("m2-air"), machine())
    assert set(statuses(lines).values()) == {"not checked"}
    assert all("not on a MacBook Air" in line.reason for line in lines)
    elsewhere = check(bench(on={**machine(), "node": "another-box"}), targets.load("host"), machine())
    assert set(statuses(elsewhere).values()) == {"not checked"}


def test_the_exit_code_says_met_missed_or_not_checked():
    from edgeport.errors import MET, MISSED, NOT_CHECKED
    from edgeport.runtime.check import verdict

    host = targets.load("host")
    assert verdict(check(bench(), host, machine())) == MET
    assert verdict(check(bench(decode=1.0), host, machine())) == MISSED
    assert verdict(check(bench(prompt_tokens=48), host, machine())) == NOT_CHECKED
    assert verdict(check(bench(prompt_tokens=48, decode=1.0), host, machine())) == MISSED
