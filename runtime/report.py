"""What a person reads: tables on stdout (rich on a terminal, markdown in a pipe or a log, or CSV), progress on
stderr."""

import csv
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

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


STYLES = ("rich", "md", "csv")


@dataclass
class Grid:
    """A table as data: a title, columns, rows of text (rich markup allowed) and notes printed below it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def show(grid: Grid, style: str | None = None) -> None:
    """Print `grid` on stdout: box drawing on a terminal, a plain markdown table (as llama-bench prints) in a pipe
    or a log, or CSV. Cells are never cut: long reasons go in the notes, one a line."""
    style = style or ("rich" if out.is_terminal else "md")
    if style == "csv":
        writer = csv.writer(out.file, lineterminator="\n")
        writer.writerows([grid.columns, *[[_plain(c) for c in row] for row in grid.rows]])
        return
    if style == "md":
        lines = [f"{grid.title}", "", "| " + " | ".join(grid.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in grid.columns) + "|")
        lines += ["| " + " | ".join(_plain(c) for c in row) + " |" for row in grid.rows]
        lines += ["", *grid.notes] if grid.notes else []
        out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=grid.title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for column in grid.columns:
        table.add_column(column, no_wrap=True)
    for row in grid.rows:
        table.add_row(*row)
    out.print(table)
    for note in grid.notes:
        out.print(note, highlight=False, soft_wrap=True)


def _plain(cell: str) -> str:
    return Text.from_markup(cell).plain


def bench_table(bench: dict, title: str) -> Grid:
    columns = ["prompt", "new", "TTFT s", "prefill tok/s", "decode tok/s", "engine peak", "peak RSS"]
    grid = Grid(title, columns, notes=[_bench_caption(bench, f"{bench['max_tokens']} new tokens")])
    for r in bench["results"]:
        grid.rows.append(
            [
                str(r["prompt_tokens"]),
                str(r["new_tokens"]),
                _with_spread(r, "ttft_s", ".2f"),
                _with_spread(r, "prefill_tps", ".1f"),
                _with_spread(r, "decode_tps", ".1f"),
                _size(r["peak_memory_gb"]),
                _size(r["peak_rss_gb"]),
            ]
        )
    return grid


def _with_spread(row: dict, name: str, spec: str) -> str:
    """The median, and mean ± standard deviation where there were several runs."""
    mean, std = row.get(f"{name}_mean_std") or (0.0, 0.0)
    median = format(row[name], spec)
    return f"{median} ({format(mean, spec)} ± {format(std, spec)})" if std else median


def _size(gb: float) -> str:
    """A size as a person reads it: MB below 1 GB, GB above."""
    return f"{gb * 1000:.0f} MB" if gb < 1 else f"{gb:.2f} GB"


def transcribe_table(bench: dict, title: str) -> Grid:
    columns = ["audio", "windows", "wall", "RTF", "encoder/window", "decoder/window", "tokens", "WER", "peak RSS"]
    grid = Grid(title, columns, notes=[_bench_caption(bench, "RTF = wall time / audio duration")])
    for r in bench["results"]:
        grid.rows.append(
            [
                f"{r['audio_s']:.1f} s",
                str(r["windows"]),
                f"{r['wall_s']:.2f} s",
                f"{r['rtf']:.4f}",
                f"{r['encode_s_per_window'] * 1000:.0f} ms",
                f"{r['decode_s_per_window'] * 1000:.0f} ms",
                str(r["tokens"]),
                f"{r['wer']:.3f}" if "wer" in r else "—",
                _size(r["peak_rss_gb"]),
            ]
        )
    return grid


def _bench_caption(bench: dict, workload: str) -> str:
    machine = bench["machine"]
    return (
        f"{bench['engine']} on {machine['cpu'] or machine['arch']} ({machine['system']}); "
        f"median (mean ± std) of {bench['runs']} runs after a warm-up; {workload}"
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
