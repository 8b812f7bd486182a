"""What a person reads: tables on stdout (rich on a terminal, markdown in a pipe or a log, or CSV), progress on
stderr."""

import csv
import platform
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


class WorkProgress:
    """One bar over a whole conversion: the step in hand, the share of the predicted work done, the time elapsed and
    an ETA; a tick line for each step done. Within a step the bar moves with the clock, up to most of the step's
    predicted share, so a step that runs long stalls the bar rather than overrunning it. The ETA is rich's: the
    predicted work left at the pace the finished work went."""

    def __init__(self, estimates: list):
        self.predicted = {e.step: max(e.seconds, 1.0) for e in estimates}
        self.count, self.done, self.finished = len(estimates), 0.0, 0

    def __enter__(self) -> "WorkProgress":
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=sum(self.predicted.values()) or 1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    @contextmanager
    def step(self, name: str, description: str) -> Iterator:
        """Step `name` (as the preflight named it; one it did not predict takes no share) under way."""
        import threading

        share = self.predicted.get(name, 0.0)
        counted = name in self.predicted
        label = f"[{self.finished + 1}/{self.count}] {description}" if counted else description
        start, stop = time.perf_counter(), threading.Event()

        def tick() -> None:
            while not stop.wait(0.5):
                moved = min(time.perf_counter() - start, 0.9 * share)
                self.bar.update(self.task, completed=self.done + moved)

        self.bar.update(self.task, description=label)
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield lambda detail: self.bar.update(self.task, description=f"{label}: {detail}")
        finally:
            stop.set()
            ticker.join()
        self.done += share
        self.finished += counted
        self.bar.update(self.task, completed=self.done)
        err.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")


STYLES = ("rich", "md", "csv")
MOE_ACTIVE_SHARE = 0.6  # below this share of weights read per token, a model is shown with its active count


@dataclass
class Grid:
    """A table as data: a title, columns, rows of text (rich markup allowed) and notes printed below it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ids: int = 2  # how many leading columns hold ids, which are never folded


def show(grid: Grid, style: str | None = None, console: Console | None = None) -> None:
    """Print `grid` on stdout (or `console`): box drawing on a terminal, a plain markdown table (as llama-bench
    prints) in a pipe or a log, or CSV. Cells are never cut: long reasons go in the notes, one a line."""
    console = console or out
    style = style or ("rich" if console.is_terminal else "md")
    if style == "csv":
        writer = csv.writer(console.file, lineterminator="\n")
        writer.writerows([grid.columns, *[[_plain(c) for c in row] for row in grid.rows]])
        return
    if style == "md":
        lines = [f"{grid.title}", "", "| " + " | ".join(grid.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in grid.columns) + "|")
        lines += ["| " + " | ".join(_plain(c) for c in row) + " |" for row in grid.rows]
        lines += ["", *grid.notes] if grid.notes else []
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=grid.title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, collapse_padding=True)
    for i, column in enumerate(grid.columns):
        # Leading columns hold ids (names, formats, quantizations): never folded. Others may fold, never be cut.
        longest = max((len(_plain(row[i])) for row in grid.rows), default=0)
        table.add_column(column, overflow="fold", min_width=longest if i < grid.ids else None)
    for row in grid.rows:
        table.add_row(*row)
    console.print(table)
    for note in grid.notes:
        console.print(note, highlight=False, markup=False)


def _plain(cell: str) -> str:
    return Text.from_markup(cell).plain


def targets_table(targets: list) -> Grid:
    grid = Grid("Targets", ["name", "RAM GB", "app may use", "GB/s", "LLM", "Whisper"])
    for t in targets:
        grid.rows.append(
            [
                t.name,
                "/".join(f"{r:g}" for r in t.ram_options_gb),
                f"{t.usable_ram_fraction:.0%}",
                f"{t.bandwidth_gbs:g}" + (" (here)" if t.measured else ""),
                ", ".join(f.name for f in t.formats),
                ", ".join(f.name for f in t.speech_formats),
            ]
        )
        compute = ", ".join(f"{unit} {v:g}" for unit, v in t.tflops.items())
        formats = ", ".join(f"{f.name} {f.quantization} on {f.unit}" for f in t.formats)
        budget = _budget_text(t.budget)
        grid.notes.append(f"{t.name}: {t.description}; {compute} TFLOPS (NPU: TOPS); LLM as {formats}; budget {budget}")
    return grid


def plan_table(plan) -> Grid:
    """The plan, one row a format with its expected speeds; below, each step's verdict on the whole budget, the
    rooflines the speeds are a calibrated share of, and the measurements each engine was calibrated on."""
    from edgeport.families import named

    family = named(plan.family)
    # A mixture of experts reads a fraction of its weights per token; a dense model's untied embedding (of which a
    # token reads one row) is no such fraction, so tied and untied dense models read alike.
    moe = plan.active_params < MOE_ACTIVE_SHARE * plan.params
    active = f", {_params(plan.active_params)} active" if moe else ""
    title = (
        f"Plan: {model_name(plan.source)} ({plan.model_type}, {_params(plan.params)} parameters{active}) on "
        f"{plan.target} ({plan.ram_gb:g} GB, {plan.bandwidth_gbs:g} GB/s)"
    )
    grid = Grid(title, ["format", "quant", "weights", "peak/usable", *family.speed_columns, "budget"])
    for s in plan.steps:
        mark = "[green]✓[/]" if s.fits else "[red]✗[/]"
        memory = f"{mark} {_gb(s.peak_bytes / GB).removesuffix(' GB')}/{plan.usable_ram_gb:.1f} GB"
        budget = "—" if s.meets_budget is None else "[green]met[/]" if s.meets_budget else "[red]missed[/]"
        row = [f"{s.format} {s.unit}", s.quantization, _gb(s.weight_bytes / GB), memory, *family.plan_speeds(s)]
        grid.rows.append([*row, budget])
        known = s.decode_roofline_tps and s.prefill_roofline_tps  # a manifest written by hand may lack one
        rooflines = f" (rooflines: {family.plan_rooflines(s)})" if known else ""
        grid.notes.append(f"{s.format} {s.quantization}: {s.verdict}{rooflines}")
    grid.notes += list(dict.fromkeys(s.calibration for s in plan.steps if s.calibration))
    if plan.source_quantization:
        grid.notes.append(
            f"the source's weights are {plan.source_quantization}: each artifact is quantized again from them, so "
            "its losses add to the source's (a format with more bits than the source holds adds size, not quality)"
        )
    kv = _gb(plan.steps[0].kv_bytes / GB) if plan.steps else "—"
    grid.notes.append(family.plan_note(plan, kv) + "; speeds are expected figures, a calibrated share of each roofline")
    meeting = [f"{s.format} {s.quantization}" for s in plan.steps if s.meets_budget]
    grid.notes.append(
        f"meets the whole budget of {plan.target}: {', '.join(meeting)}"
        if meeting
        else f"nothing planned meets the whole budget of {plan.target}"
    )
    return grid


def fit_table(fit) -> Grid:
    """Every variant `fit` swept: its size, memory and expected speed, the budget, and its quality (measured here,
    published, or unknown); below, the recommendation and its reason, then where the figures come from."""
    from edgeport.families import FAMILIES

    family = next(f for f in FAMILIES.values() if f.workload == fit.task)
    several = len({v.model for v in fit.variants}) > 1
    loss = "Δ WER" if fit.task == "transcribe" else "ppl Δ"
    grid = Grid(
        f"Fit for {fit.target}: {', '.join(dict.fromkeys(model_name(v.model) for v in fit.variants))}",
        [
            *(["model"] if several else []),
            "format",
            "quant",
            "size",
            "peak",
            *family.speed_columns,
            "budget",
            loss,
            "top-1",
            "quality",
        ],
        ids=3 if several else 2,
    )
    for i, v in enumerate(fit.variants):
        s, q = v.step, v.quality
        mark = "[bold green]★[/] " if i == fit.recommended else ""
        budget = "[green]met[/]" if s.meets_budget else "[red]missed[/]"
        figure = "—" if q.loss is None else f"{q.loss:+.3f}" if fit.task == "transcribe" else f"{q.loss:+.1%}"
        origin = {
            "measured": "measured",
            "published": f"[yellow]published[/] ({q.like})",
            "unknown": "[dim]unknown[/]",
        }[q.origin]
        if q.parity == "failed":
            origin += " [red](fails parity)[/]"
        top1 = f"{q.top1_agreement:.3f}" if q.top1_agreement is not None else "—"
        row = [f"{mark}{s.format} {s.unit}", s.quantization, _gb(s.weight_bytes / GB), _gb(s.peak_bytes / GB)]
        row += family.plan_speeds(s)
        grid.rows.append([*([model_name(v.model)] if several else []), *row, budget, figure, top1, origin])
    pick = fit.pick
    grid.notes.append(f"★ recommended: {fit.reason}" if pick else f"no recommendation: {fit.reason}")
    grid.notes += fit.notes
    unknown: dict[str, list[str]] = {}
    for v in fit.variants:
        if v.quality.origin == "unknown":
            unknown.setdefault(v.quality.note, []).append(v.label)
    grid.notes += [f"{', '.join(labels)}: {note}" for note, labels in unknown.items()]
    if any(v.quality.origin == "published" for v in fit.variants):
        grid.notes.append("published (T): the figure llama.cpp's scoreboard gives its type T, the nearest scheme")
    measure = "Δ WER on the parity clips" if fit.task == "transcribe" else "ppl Δ: perplexity over the source's"
    grid.notes.append(
        f"budget of {fit.target}: {_fit_budget_text(fit.budget, fit.task)}; speeds and memory are the plan's "
        f"(expected); {measure}"
    )
    return grid


def _fit_budget_text(budget, task: str) -> str:
    """The budget lines a fit judges its task by."""
    parts = [f"peak ≤ {budget.peak_memory_gb:g} GB"]
    if task == "transcribe":
        return ", ".join(parts + ([f"RTF ≤ {budget.rtf:g}"] if budget.rtf else []))
    if budget.decode_tps:
        parts.append(f"decode ≥ {budget.decode_tps:g} tok/s")
    if budget.ttft_s:
        parts.append(f"TTFT ≤ {budget.ttft_s:g} s at {budget.prompt_tokens} tokens")
    return ", ".join(parts)


def artifacts_table(manifest) -> Grid:
    family = manifest.source.model_family
    title = f"Artifacts of {model_name(manifest.source.ref)} for {manifest.target.name}"
    grid = Grid(title, ["format", "quant", "size", "parity", *family.metric_columns])
    for a in manifest.artifacts:
        p, m = a.parity, a.parity.metrics
        colour = {"passed": "green", "failed": "red"}.get(p.status, "yellow")
        metrics = family.metric_cells(m, _num)
        grid.rows.append([a.format, a.quantization, _bytes(a.bytes), f"[{colour}]{p.status}[/]", *metrics])
        name = f"{a.format} {a.quantization}"
        grid.notes += family.metric_notes(name, m, _num) if m else []
        grid.notes += [f"{name}: {f}" for f in p.failures]
        grid.notes += [f"{name}: not checked: {n}" for n in p.not_checked]
    for skipped in manifest.not_built:
        blank = [""] * len(family.metric_columns)
        grid.rows.append([skipped.format, skipped.quantization, "—", "[yellow]not built[/]", *blank])
        grid.notes.append(f"{skipped.format} {skipped.quantization}: not built: {skipped.reason}")
    return grid


def work_table(work, out) -> Grid:
    """The preflight's plan of work: each step in order with its predicted cost on this machine, and what it
    leaves out."""
    where = platform.node() or "this machine"
    grid = Grid(f"Plan of work on {where}", ["step", "memory", "time", "writes"], ids=1)
    for e in work.estimates:
        left_out = e.format in work.left_out or (e.parity and e.format in work.unchecked)
        step = f"[dim]{e.step} (left out)[/]" if left_out else e.step
        writes = _bytes(e.writes_bytes) if e.writes_bytes else "—"
        grid.rows.append([step, f"≈ {_bytes(e.peak_bytes)}", f"≈ {_duration(e.seconds)}", writes])
    total = sum(e.seconds for e in work.estimates if e.format not in work.left_out)
    folders = sorted({f"{e.format}/" for e in work.estimates if e.format and e.format not in work.left_out})
    files = [*folders, *(["reference/"] if work.parity != "none" else []), "manifest.json"]
    grid.notes.append(
        f"predicted from the config: peak memory of each step's own process, and time on a machine like the one the "
        f"rates were measured on (≈ {_duration(total)} in all); into {out}: {', '.join(files)}"
    )
    grid.notes += [f"{fmt}: not built: {why}" for fmt, why in work.left_out.items()]
    grid.notes += [f"{fmt}: not checked: {why}" for fmt, why in work.unchecked.items()]
    return grid


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def steps_table(manifest) -> Grid:
    """What each step of a conversion cost on this machine, each in a process of its own."""
    where = platform.node() or "this machine"
    grid = Grid(f"What each step cost on {where}", ["step", "time", "peak memory"], ids=1)
    for cost in manifest.steps:
        grid.rows.append([cost.step, f"{cost.seconds:.1f} s", _bytes(cost.peak_rss_bytes)])
    total = sum(cost.seconds for cost in manifest.steps)
    grid.notes.append(f"{total:.0f} s in all; peak memory is each step's own process (resident set)")
    return grid


def provenance_table(manifest) -> Grid:
    """Where an output came from: the source's files with their hashes, and the tools that made it."""
    grid = Grid(f"Provenance of {model_name(manifest.source.ref)}", ["what", "value"], ids=1)
    for name, digest in (manifest.source.sha256 or {}).items():
        grid.rows.append([f"source {name}", f"sha256 {digest}"])
    grid.rows += [[tool, str(version)] for tool, version in manifest.tools.items()]
    return grid


def model_name(ref: str) -> str:
    """A model's name as a person calls it: the folder or file name, not the whole path."""
    from edgeport.source import source_name

    return source_name(ref) or ref


def _gb(gb: float) -> str:
    """A size in GB, in MB below 0.01 GB where GB would read as 0.00."""
    return f"{gb * 1000:.1f} MB" if gb < 0.01 else f"{gb:.2f} GB"


def _params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _bytes(count: int) -> str:
    return _gb(count / GB)


def _num(metrics: dict, name: str, spec: str) -> str:
    """A metric as text, or a dash where it was not measured (or overflowed)."""
    value = metrics.get(name)
    return "—" if value is None else format(value, spec)


def bench_table(bench, title: str) -> Grid:
    """A bench result as its workload reads."""
    return {"summarize": _summary_table, "transcribe": _transcription_table}[bench.workload](bench, title)


def _summary_table(bench, title: str) -> Grid:
    columns = ["prompt", "new", "TTFT s", "prefill tok/s", "decode tok/s", "engine peak", "peak RSS"]
    grid = Grid(title, columns, notes=[_bench_caption(bench, f"{bench.max_tokens} new tokens")])
    for r in bench.results:
        grid.rows.append(
            [
                str(r.prompt_tokens),
                str(r.new_tokens),
                _with_spread(r, "ttft_s", ".2f"),
                _with_spread(r, "prefill_tps", ".1f"),
                _with_spread(r, "decode_tps", ".1f"),
                _size(r.peak_memory_gb),
                _size(r.peak_rss_gb),
            ]
        )
    return grid


def _with_spread(row, name: str, spec: str) -> str:
    """The median, and mean ± standard deviation where there were several runs."""
    mean, std = getattr(row, f"{name}_mean_std")
    median = format(getattr(row, name), spec)
    return f"{median} ({format(mean, spec)} ± {format(std, spec)})" if std else median


def _size(gb: float) -> str:
    """A size as a person reads it: MB below 1 GB, GB above."""
    return f"{gb * 1000:.0f} MB" if gb < 1 else f"{gb:.2f} GB"


def _transcription_table(bench, title: str) -> Grid:
    columns = ["audio", "windows", "wall", "RTF", "encoder/window", "decoder/window", "tokens", "WER", "peak RSS"]
    grid = Grid(title, columns, notes=[_bench_caption(bench, "RTF = wall time / audio duration")])
    for r in bench.results:
        grid.rows.append(
            [
                f"{r.audio_s:.1f} s",
                str(r.windows),
                f"{r.wall_s:.2f} s",
                f"{r.rtf:.4f}",
                f"{r.encode_s_per_window * 1000:.0f} ms",
                f"{r.decode_s_per_window * 1000:.0f} ms",
                str(r.tokens),
                f"{r.wer:.3f}" if r.wer is not None else "—",
                _size(r.peak_rss_gb),
            ]
        )
    return grid


def _bench_caption(bench, workload: str) -> str:
    machine = bench.machine
    return (
        f"{bench.engine} on {machine['cpu'] or machine['arch']} ({machine['system']}); "
        f"median (mean ± std) of {bench.runs} runs after a warm-up; {workload}"
        + (f"; {bench.note}" if bench.note else "")
    )


def check_table(lines: list, target: str) -> Grid:
    grid = Grid(f"Budget of {target}", ["budget", "limit", "measured", "status"])
    for line in lines:
        colour = {"met": "green", "missed": "red"}.get(line.status, "yellow")
        grid.rows.append([line.budget, line.limit_text, line.measured_text, f"[{colour}]{line.status}[/]"])
        if line.reason:
            grid.notes.append(f"{line.budget}: {line.reason}")
    return grid


def _budget_text(budget) -> str:
    parts = [
        ("TTFT ≤ {} s", budget.ttft_s),
        ("decode ≥ {} tok/s", budget.decode_tps),
        ("RTF ≤ {}", budget.rtf),
        ("WER ≤ {}", budget.wer),
        ("peak ≤ {} GB", budget.peak_memory_gb),
    ]
    return ", ".join(text.format(f"{value:g}") for text, value in parts if value is not None) or "none"
