"""What a person reads: rich tables on stdout, progress on stderr."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)
GB = 1e9


@contextmanager
def step(description: str) -> Iterator:
    """A spinner with the elapsed time while a long step runs; a tick and its duration when it ends."""
    start = time.perf_counter()
    with err.status(f"{description}…") as status:
        yield lambda detail: status.update(f"{description}: {detail} ({time.perf_counter() - start:.0f} s)")
    err.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")


def targets_table(targets: list) -> Table:
    table = Table(title="Targets")
    columns = ("name", "device", "RAM GB", "app may use", "GB/s", "compute TFLOPS/TOPS", "LLM", "Whisper", "budget")
    for column in columns:
        table.add_column(column)
    for t in targets:
        table.add_row(
            t.name,
            t.description,
            "/".join(f"{r:g}" for r in t.ram_options_gb),
            f"{t.usable_ram_fraction:.0%}",
            f"{t.bandwidth_gbs:g}" + (" (measured)" if t.measured else ""),
            ", ".join(f"{unit} {v:g}" for unit, v in t.tflops.items()),
            ", ".join(f"{f.name} {f.quantization}" for f in t.formats),
            ", ".join(f"{f.name} {f.quantization}" for f in t.speech_formats),
            _budget_text(t.budget),
        )
    return table


def plan_table(plan) -> Table:
    speech = plan.family == "whisper"
    table = Table(
        title=f"Plan: {plan.source} ({plan.model_type}, {plan.params / 1e6:.1f}M parameters"
        + (f", {plan.active_params / 1e6:.1f}M active" if plan.active_params < plan.params else "")
        + f") on {plan.target} ({plan.ram_gb:g} GB, {plan.bandwidth_gbs:g} GB/s)",
        caption=(
            f"per 30 s window of speech; KV caches at {plan.context_length} tokens and 1500 frames; RTF assumes "
            "100 tokens a window"
            if speech
            else f"KV cache at {plan.context_length} tokens; TTFT at {plan.prompt_tokens} prompt tokens"
        )
        + "; speeds are rooflines (upper bounds)",
    )
    speed_columns = ("encoder s", "decode tok/s", "RTF") if speech else ("prefill tok/s", "decode tok/s", "TTFT")
    for column in ("format", "quant", "unit", "weights", "KV cache", "peak", *speed_columns, "verdict"):
        table.add_column(column, justify="right" if column not in ("format", "quant", "unit", "verdict") else "left")
    for s in plan.steps:
        speeds = (
            (f"{s.ttft_s:.3f}", f"{s.decode_tps:,.0f}", f"{s.rtf:.4f}")
            if speech
            else (f"{s.prefill_tps:,.0f}", f"{s.decode_tps:,.0f}", f"{s.ttft_s:.2f} s")
        )
        table.add_row(
            s.format,
            s.quantization,
            s.unit,
            f"{s.weight_bytes / GB:.2f} GB",
            f"{s.kv_bytes / GB:.2f} GB",
            f"{s.peak_bytes / GB:.2f} GB",
            *speeds,
            ("[green]" if s.fits else "[red]") + s.verdict,
        )
    return table


def artifacts_table(manifest: dict) -> Table:
    speech = manifest["source"].get("family") == "whisper"
    table = Table(title=f"Artifacts of {manifest['source']['ref']} for {manifest['target']['name']}")
    metric_columns = (
        ("WER source → artifact", "delta", "clips no worse")
        if speech
        else ("top-1", "KL", "cosine", "perplexity src → artifact")
    )
    for column in ("format", "quant", "size", "parity", *metric_columns):
        table.add_column(column)
    notes = []
    for a in manifest["artifacts"]:
        p, m = a["parity"], a["parity"]["metrics"]
        colour = {"passed": "green", "failed": "red"}.get(p["status"], "yellow")
        metrics = (
            (
                f"{_num(m, 'wer_source', '.3f')} → {_num(m, 'wer_artifact', '.3f')}",
                _num(m, "wer_delta", "+.3f"),
                _num(m, "no_regression_share", ".0%"),
            )
            if speech
            else (
                _num(m, "top1_agreement", ".3f"),
                _num(m, "kl_mean", ".4f"),
                _num(m, "cosine_mean", ".4f"),
                f"{_num(m, 'ppl_source', '.2f')} → {_num(m, 'ppl_artifact', '.2f')} ({_num(m, 'ppl_delta', '+.1%')})",
            )
        )
        table.add_row(
            a["format"], a["quantization"], f"{a['bytes'] / 1e6:.1f} MB", f"[{colour}]{p['status']}[/]", *metrics
        )
        notes += [f"{a['format']} {a['quantization']}: {f}" for f in p["failures"]]
        notes += [f"{a['format']} {a['quantization']}: not checked: {n}" for n in p["not_checked"]]
    for skipped in manifest["not_built"]:
        blanks = [""] * len(metric_columns)
        table.add_row(skipped["format"], skipped["quantization"], "—", "[yellow]not built[/]", *blanks)
        notes.append(f"{skipped['format']} {skipped['quantization']}: not built: {skipped['reason']}")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def _num(metrics: dict, name: str, spec: str) -> str:
    """A metric as text, or a dash where it was not measured (or overflowed)."""
    value = metrics.get(name)
    return "—" if value is None else format(value, spec)


def bench_table(bench: dict, title: str) -> Table:
    table = Table(title=title, caption=_bench_caption(bench, f"{bench['max_tokens']} new tokens"))
    for column in ("prompt tokens", "new tokens", "TTFT", "prefill tok/s", "decode tok/s", "engine peak", "peak RSS"):
        table.add_column(column, justify="right")
    for r in bench["results"]:
        table.add_row(
            str(r["prompt_tokens"]),
            str(r["new_tokens"]),
            f"{r['ttft_s']:.2f} s",
            f"{r['prefill_tps']:.1f}",
            f"{r['decode_tps']:.1f}",
            f"{r['peak_memory_gb'] * 1000:.0f} MB",
            f"{r['peak_rss_gb'] * 1000:.0f} MB",
        )
    return table


def transcribe_table(bench: dict, title: str) -> Table:
    table = Table(title=title, caption=_bench_caption(bench, "RTF = wall time / audio duration"))
    columns = ("audio", "windows", "wall", "RTF", "encoder / window", "decoder / window", "tokens", "WER", "peak RSS")
    for column in columns:
        table.add_column(column, justify="right")
    for r in bench["results"]:
        table.add_row(
            f"{r['audio_s']:.1f} s",
            str(r["windows"]),
            f"{r['wall_s']:.2f} s",
            f"{r['rtf']:.4f}",
            f"{r['encode_s_per_window'] * 1000:.0f} ms",
            f"{r['decode_s_per_window'] * 1000:.0f} ms",
            str(r["tokens"]),
            f"{r['wer']:.3f}" if "wer" in r else "—",
            f"{r['peak_rss_gb'] * 1000:.0f} MB",
        )
    return table


def _bench_caption(bench: dict, workload: str) -> str:
    machine = bench["machine"]
    return (
        f"{bench['engine']} on {machine['cpu'] or machine['arch']} ({machine['system']}); "
        f"median of {bench['runs']} runs after a warm-up; {workload}"
        + (f"; {bench['note']}" if bench.get("note") else "")
    )


def check_table(lines: list, target: str) -> Table:
    table = Table(title=f"Budget of {target}")
    for column in ("budget", "limit", "measured", "status", "why"):
        table.add_column(column)
    for line in lines:
        colour = {"met": "green", "missed": "red"}.get(line.status, "yellow")
        table.add_row(line.budget, line.limit_text, line.measured_text, f"[{colour}]{line.status}[/]", line.reason)
    return table


def _budget_text(budget) -> str:
    parts = [
        ("TTFT ≤ {} s", budget.ttft_s),
        ("decode ≥ {} tok/s", budget.decode_tps),
        ("RTF ≤ {}", budget.rtf),
        ("WER ≤ {}", budget.wer),
        ("peak ≤ {} GB", budget.peak_memory_gb),
    ]
    return ", ".join(text.format(f"{value:g}") for text, value in parts if value is not None) or "none"
