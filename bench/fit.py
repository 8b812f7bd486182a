"""`make bench`, bench/fit.json: is `edgeport fit` right about this machine, and how long does it take?

`edgeport fit` of the SmolLM2 fixture for `host`, cold (an empty cache: every variant converted and checked) and warm
(the same again: the cached figures). Then every variant of the sweep is converted on its own (`convert -f FORMAT
--quant Q --parity none`) and benched (`edgeport bench`, one 512-token summary prompt, 128 new tokens, two runs, as
the plan's TTFT budget is set), its decode speed and peak memory beside what fit predicted (goals: within 25 % and
10 %). MLX's CPU build is benched too, though the host profile ranks it last off a Mac.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from run import BIN, fixture, run, write

PROMPT_TOKENS = 512
NEW_TOKENS = 128
RUNS = 2
GOALS = {"decode": 0.25, "peak": 0.10}
console = Console()


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="edgeport-bench-fit-"))
    cache = scratch / "cache"
    cache.mkdir()
    user_cache = Path(os.environ.get("EDGEPORT_CACHE", Path.home() / ".cache" / "edgeport"))
    for name in ("host.json", "host-race.json"):  # the same host figures (and engine order) as the user's
        if (user_cache / name).is_file():
            shutil.copy(user_cache / name, cache / name)
    env = {**os.environ, "EDGEPORT_CACHE": str(cache)}
    fit_file = scratch / "fit.json"
    command = [str(BIN / "edgeport"), "fit", str(fixture()), "-t", "host", "--quality", "measured", "--out"]
    cold = timed([*command, str(fit_file)], env)
    warm = timed([*command, str(scratch / "fit-warm.json")], env)
    found = json.loads(fit_file.read_text())
    rows = [measure(v, scratch) for v in found["variants"]]
    shutil.rmtree(scratch, ignore_errors=True)
    measured = [r for r in rows if "error" not in r]
    decode = [abs(r["decode_error"]) for r in measured]
    peak = [abs(r["peak_error"]) for r in measured]
    result = {
        "model": fixture().name,
        "target": "host",
        "fit_seconds": {"cold": cold, "warm": warm, "warm_goal": 5.0},
        "recommended": found["reason"],
        "variants": rows,
        "summary": {
            "median_abs_decode_error": round(statistics.median(decode), 3),
            "median_abs_peak_error": round(statistics.median(peak), 3),
            "decode_within_25_percent": f"{sum(e <= GOALS['decode'] for e in decode)}/{len(measured)}",
            "peak_within_10_percent": f"{sum(e <= GOALS['peak'] for e in peak)}/{len(measured)}",
            "failed": [f"{r['format']} {r['quantization']}" for r in rows if "error" in r],
        },
    }
    write("fit", result)
    show(result)


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    run(command, env)
    return round(time.perf_counter() - start, 1)


def measure(variant: dict, scratch: Path) -> dict:
    """Convert one variant without parity, bench it, and set the measurement beside fit's prediction."""
    step = variant["step"]
    fmt, quant = step["format"], step["quantization"]
    out = scratch / f"{fmt}-{quant}"
    convert = ["convert", str(fixture()), "-t", "host", "-f", fmt, "--quant", quant, "--parity", "none"]
    bench = ["bench", str(out), "-f", fmt, "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS), "-r", str(RUNS), "--json"]
    try:
        run([str(BIN / "edgeport"), *convert, "--out", str(out)], check=False)
        measured = json.loads(run([str(BIN / "edgeport"), *bench], check=False))["results"][0]
    except RuntimeError as e:
        return {"format": fmt, "quantization": quant, "error": str(e)[-600:]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak_gb = max(measured["peak_memory_gb"], measured["peak_rss_gb"])
    predicted_peak = step["peak_bytes"] / 1e9
    return {
        "format": fmt,
        "quantization": quant,
        "quality": variant["quality"]["loss"],
        "quality_origin": variant["quality"]["origin"],
        "decode_predicted": step["decode_tps"],
        "decode_measured": round(measured["decode_tps"], 2),
        "decode_error": round(measured["decode_tps"] / step["decode_tps"] - 1, 3),
        "peak_predicted_gb": round(predicted_peak, 3),
        "peak_measured_gb": round(peak_gb, 3),
        "peak_error": round(peak_gb / predicted_peak - 1, 3),
    }


def show(result: dict) -> None:
    table = Table(title=f"fit for host, {result['model']}: predicted vs measured")
    for column in ("variant", "ppl Δ", "decode pred", "decode meas", "err", "peak pred", "peak meas", "err"):
        table.add_column(column)
    for r in result["variants"]:
        if "error" in r:
            table.add_row(f"{r['format']} {r['quantization']}", "failed", *[""] * 6)
            continue
        quality = "—" if r["quality"] is None else f"{r['quality']:+.1%}"
        table.add_row(
            f"{r['format']} {r['quantization']}",
            quality,
            f"{r['decode_predicted']:.1f}",
            f"{r['decode_measured']:.1f}",
            f"{r['decode_error']:+.0%}",
            f"{r['peak_predicted_gb']:.2f}",
            f"{r['peak_measured_gb']:.2f}",
            f"{r['peak_error']:+.0%}",
        )
    console.print(table)
    console.print(result["summary"], result["fit_seconds"])


if __name__ == "__main__":
    sys.exit(main())
