"""edgeport's command line: convert, plan, fit, bench, check, report, targets, inspect."""

import json
import signal
import sys
from pathlib import Path

import click
import psutil
from rich.markup import escape

from edgeport import __version__, isolated, manifest, report, targets
from edgeport.errors import ERROR, MET, MISSED, NOT_CHECKED, EdgeportError
from edgeport.files import read_json
from edgeport.quantization import QUANTIZATIONS
from edgeport.quiet import silence_libraries

EXIT_CODES = f"""\b
Exit codes, for every command:
  {MET}    done; every budget line met
  {MISSED}    the answer is no: a budget line missed (check), parity failed (convert), files changed (inspect)
  {NOT_CHECKED}    a budget line could not be judged on this machine (check), none missed
  {ERROR}    bad input or another error, said in one line
  128+N  stopped by signal N (130 for Ctrl-C); no partial output is left"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also after the subcommand).")
@click.option("--verbose", is_flag=True, help="Let the libraries print their own progress and warnings too.")
@click.version_option(__version__, prog_name="edgeport")
def cli(debug: bool, verbose: bool) -> None:
    """Plan, convert, check and bench a Hugging Face model for a device."""


def main() -> None:
    # --debug and --verbose are taken wherever they stand, before or after the subcommand.
    debug, verbose = "--debug" in sys.argv[1:], "--verbose" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a not in ("--debug", "--verbose")]
    if not verbose:
        silence_libraries()
    for stop in (signal.SIGTERM, signal.SIGHUP):  # unwound like Ctrl-C: staging removed, child processes ended
        signal.signal(stop, _interrupt)
    try:
        cli.main(args=args, standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        stop = _stopped_by[-1] if _stopped_by else signal.SIGINT
        report.err.print(f"[red]interrupted[/] ({stop.name}): no partial output was left")
        sys.exit(128 + stop)
    except click.ClickException as e:
        e.show()
        sys.exit(ERROR)
    except EdgeportError as e:
        if debug:
            raise
        report.err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug:
            raise
        report.err.print(
            f"[red]error:[/] unexpected {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
            soft_wrap=True,
            highlight=False,
        )
        sys.exit(ERROR)


def options(*decorators):
    """Several click options as one decorator, in the order given."""

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


source_options = options(
    click.option("--revision", help="Hub revision (branch, tag or commit) of a hub id."),
    click.option("--allow-pickle", is_flag=True, help="Read pickle weights (only from authors you trust)."),
    click.option("--trust-remote-code", is_flag=True, help="Let transformers run the checkpoint's own code."),
)
target_options = options(
    click.option(
        "--target",
        "-t",
        "target_name",
        required=True,
        help="Target device (see `edgeport targets`), or a .toml profile of your own.",
        shell_complete=lambda ctx, param, incomplete: [n for n in targets.names() if n.startswith(incomplete)],
    ),
    click.option("--ram", type=float, help="RAM variant of the target in GB (e.g. 8 for an 8 GB M2 Air)."),
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
context_option = click.option(
    "--context",
    type=click.IntRange(min=1),
    metavar="TOKENS",
    help="KV cache length to plan and build for (default: the target's context length).",
)
quant_option = click.option(
    "--quant",
    help="Quantization instead of the target's preference, wherever it applies.",
    shell_complete=lambda ctx, param, incomplete: [q for q in QUANTIZATIONS if q.startswith(incomplete)],
)


@cli.command("targets")
@click.option("--measure", is_flag=True, help="Measure this machine (host) again instead of using its cached figures.")
@json_option
def targets_command(measure: bool, as_json: bool) -> None:
    """List the target devices."""
    if measure:
        targets.host_facts(remeasure=True)
    loaded = [targets.load(name) for name in targets.names()]
    if as_json:
        from dataclasses import asdict

        _print_json([asdict(t) for t in loaded])
    else:
        report.show(report.targets_table(loaded))


@cli.command()
@click.argument("model")
@target_options
@click.option("--formats", "-f", help="Comma-separated formats to plan (default: all the target runs).")
@quant_option
@context_option
@source_options
@json_option
def plan(model, target_name, ram, formats, quant, context, revision, allow_pickle, trust_remote_code, as_json) -> None:
    """Predict memory and speed of MODEL on a target, from its config alone. Exits 0 when a planned format meets
    the target's whole budget (memory, decode and TTFT, or RTF for speech), 1 when none does."""
    from edgeport.plan import make_plan
    from edgeport.source import open_source

    target = targets.load(target_name, ram, context)
    source = open_source(
        model, revision=revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, config_only=True
    )
    result = make_plan(source, target, _split(formats), quant)
    if as_json:
        _print_json(result.to_dict())
    else:
        report.show(report.plan_table(result))
    if not any(step.meets_budget for step in result.steps):
        sys.exit(MISSED)


@cli.command()
@click.argument("model")
@target_options
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output folder (default: out/<model>-<target>).")
@click.option("--formats", "-f", help="Comma-separated formats to build (default: all the target runs).")
@quant_option
@context_option
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--allow-parity-fail", is_flag=True, help="Exit 0 even when an artifact fails parity.")
@click.option(
    "--parity",
    type=click.Choice(["full", "fast", "none"]),
    default="full",
    show_default=True,
    help="Check each artifact against the source on every parity input, on fewer tokens, or not at all "
    "(recorded as not checked).",
)
@click.option(
    "--max-memory",
    type=click.FloatRange(min=0, min_open=True),
    metavar="GB",
    help="Memory the conversion may use at once (default: what this machine has available now).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan of work (steps, their cost here, files) and stop before any."
)
@click.option(
    "--aihub",
    is_flag=True,
    help="Also compile, profile and run the NPU graphs on the target's Qualcomm AI Hub device "
    "(needs qai-hub configured).",
)
@source_options
@json_option
def convert(
    model,
    target_name,
    ram,
    out,
    formats,
    quant,
    context,
    force,
    allow_parity_fail,
    parity,
    max_memory,
    dry_run,
    aihub,
    revision,
    allow_pickle,
    trust_remote_code,
    as_json,
) -> None:
    """Build every artifact of MODEL that the target runs, check each against the source, write a manifest.
    Before any weight is read or downloaded, each step's memory, time and disk on this machine are predicted from
    the config, and what this machine has no room for is refused (or, for formats not asked for by name, left out)."""
    from edgeport import output, preflight
    from edgeport.build import build, buildable
    from edgeport.plan import make_plan
    from edgeport.source import open_source, refuse_quantized, source_name

    target = targets.load(target_name, ram, context)
    out = out or Path("out") / f"{source_name(model)}-{target.name}"
    local = Path(model).expanduser()
    opening = {"revision": revision, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}

    def work_for(source):
        refuse_quantized(source)  # before any download
        the_plan = make_plan(source, target, _split(formats), quant)
        steps, _ = buildable(the_plan, source.family)
        room = preflight.Room.here(out, max_memory, source.fills_cache)
        return the_plan, preflight.plan_work(source, target, the_plan, steps, parity, room, asked=formats is not None)

    if dry_run:
        the_plan, work = work_for(open_source(model, config_only=True, **opening))
        if as_json:
            _print_json({"plan": the_plan.to_dict(), "work": _dict(work)})
        else:
            report.show(report.plan_table(the_plan))
            report.show(report.work_table(work, out))
        return
    # Claimed before the source is read (which can take minutes): a refusal costs the user nothing. The weights are
    # read (or downloaded) only once the plan and the preflight say something will be built.
    with output.claim(out, force=force, sources=[local] if local.exists() else []) as staging:
        the_plan, work = work_for(open_source(model, config_only=True, **opening))
        if not as_json:
            report.show(report.plan_table(the_plan))
            report.show(report.work_table(work, out))
        if the_plan.source_quantization:
            report.err.print(
                f"[yellow]warning:[/] {escape(model)} holds {the_plan.source_quantization}: it is dequantized to "
                "float16 first, so each artifact's quantization losses add to the source's",
                soft_wrap=True,
            )
        with report.step(f"Opening {source_name(model)}"):
            source = open_source(model, **opening)
        output.refuse_overlap(out, source.local_paths())
        result = build(source, target, the_plan, staging, work, aihub=aihub)
    if as_json:
        _print_json(result.to_dict())
    else:
        report.show(report.artifacts_table(result))
        report.show(report.steps_table(result))
        report.out.print(f"Wrote {out}")
    failed = [a for a in result.artifacts if a.parity.status == "failed"]
    if failed and not allow_parity_fail:
        names = ", ".join(f"{a.format} {a.quantization} ({'; '.join(a.parity.failures)})" for a in failed)
        raise EdgeportError(
            f"parity failed for {names}; {out} is kept and marked failed (pass --allow-parity-fail to accept it)",
            exit_code=MISSED,
        )


@cli.command("fit")
@click.argument("models", nargs=-1, required=True)
@target_options
@click.option(
    "--task",
    type=click.Choice(["summarize", "transcribe"]),
    help="What the models are for (default: what they do; a model of the other kind is refused).",
)
@click.option(
    "--budget-decode", type=click.FloatRange(min=0, min_open=True), metavar="TOK/S", help="Decode speed, at least."
)
@click.option(
    "--budget-ttft", type=click.FloatRange(min=0, min_open=True), metavar="S", help="Time to first token, at most."
)
@click.option("--budget-rtf", type=click.FloatRange(min=0, min_open=True), help="Real-time factor, at most (speech).")
@click.option(
    "--budget-memory", type=click.FloatRange(min=0, min_open=True), metavar="GB", help="Peak memory, at most."
)
@click.option(
    "--quality",
    type=click.Choice(["auto", "measured", "published"]),
    default="auto",
    show_default=True,
    help="Measure each variant here (converted and checked against the source, cached), take llama.cpp's published "
    "perplexity table, or (auto) measure when the weights are here and it takes at most 15 min.",
)
@click.option("--convert", "build_it", is_flag=True, help="Then build the recommended variant, as `convert` does.")
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON (for `report`)."
)
@context_option
@source_options
@json_option
@click.pass_context
def fit_command(
    ctx,
    models,
    target_name,
    ram,
    task,
    budget_decode,
    budget_ttft,
    budget_rtf,
    budget_memory,
    quality,
    build_it,
    out,
    context,
    revision,
    allow_pickle,
    trust_remote_code,
    as_json,
) -> None:
    """Which model and quantization to ship to a target: every quantization of every format the target runs, for
    each of MODELS, with its size, memory, expected speed, whether it meets the whole budget, and its quality; then
    the best that meets it. Exits 0 with a recommendation, 1 when no variant meets the budget."""
    from dataclasses import replace

    from edgeport import fit as fit_module
    from edgeport.source import open_source

    if build_it and as_json:
        raise EdgeportError("--convert prints convert's tables: drop --json, or run `edgeport convert … --json` after")
    target = targets.load(target_name, ram, context)
    overrides = {"decode_tps": budget_decode, "ttft_s": budget_ttft, "rtf": budget_rtf, "peak_memory_gb": budget_memory}
    target = replace(target, budget=replace(target.budget, **{k: v for k, v in overrides.items() if v is not None}))
    if out and out.exists():
        fit_module.Fit.from_dict(read_json(out, ""), str(out))  # only a fit's own file is replaced
    opening = {"revision": revision, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    sources = [open_source(model, config_only=True, **opening) for model in models]
    tasks = {s.family.workload for s in sources}
    wanted = task or (tasks.pop() if len(tasks) == 1 else None)
    if wanted is None:
        raise EdgeportError("these models are summarizers and transcribers: fit each kind apart (or pass --task)")
    for source in sources:
        if source.family.workload != wanted:
            raise EdgeportError(f"{source.ref}: a {source.family.name} model does not {wanted}")
    result = fit_module.fit(sources, target, quality)
    if out:
        _write_json(out, result.to_dict())
    if as_json:
        _print_json(result.to_dict())
    else:
        report.show(report.fit_table(result))
    pick = result.pick
    if pick and build_it:
        ctx.invoke(
            convert,
            model=pick.model,
            target_name=target_name,
            ram=ram,
            formats=pick.step.format,
            quant=pick.step.quantization,
            context=context,
            **opening,
        )
    if pick is None:
        sys.exit(MISSED)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "-f", "fmt", help="Which artifact to bench (default: the fastest this machine runs).")
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text to summarize (default: Python's own reference on its execution model).",
)
@click.option(
    "--audio",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Whisper: speech to transcribe, WAV or FLAC at any rate (default: the 44 s Tale of Two Cities reading).",
)
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Whisper: the transcript of --audio, for WER.",
)
@click.option(
    "--language", help="Whisper: the language spoken (default: detected in each 30 s window, as Whisper does)."
)
@click.option(
    "--task",
    type=click.Choice(["transcribe", "translate"]),
    default="transcribe",
    show_default=True,
    help="Whisper: transcribe, or translate into English (multilingual models).",
)
@click.option("--prompt-tokens", "-p", help="Comma-separated prompt lengths (default 512,2048; 48 for MLX off a Mac).")
@click.option(
    "--max-tokens", "-n", type=click.IntRange(min=1), help="New tokens per run (default 128; 4 for MLX off a Mac)."
)
@click.option(
    "--runs",
    "-r",
    type=click.IntRange(min=1),
    help="Measured runs per prompt length, after one warm-up (default 3; 1 off a Mac).",
)
@json_option
@click.option(
    "--output",
    "-o",
    "output_style",
    type=click.Choice(["md", "csv", "json"]),
    help="Print the results as a markdown table, CSV or JSON (default: a table; markdown when piped).",
)
def bench(
    out, fmt, text, audio, reference, language, task, prompt_tokens, max_tokens, runs, as_json, output_style
) -> None:
    """Measure an artifact of OUT: summarizing (TTFT, prefill and decode tok/s, peak memory) or, for Whisper,
    transcribing (real-time factor, encoder and decoder time per 30 s window, peak memory, WER)."""
    from edgeport.runtime import BenchOptions

    found = manifest.read(out)
    family = found.source.model_family
    contenders = _contenders(found, fmt, out)
    options = BenchOptions(
        text=text,
        prompt_tokens=_token_counts(prompt_tokens) if prompt_tokens else None,
        max_tokens=max_tokens,
        audio=audio,
        reference=reference,
        language=language,
        task=task,
        runs=runs,
    )
    race = len(contenders) > 1
    busy = psutil.cpu_percent(interval=0.5) if race else 0.0  # before a race: is it quiet here?
    results = []
    for artifact, layout in contenders:
        if race:  # each contender in a process of its own, so that the peak memory it reports is its own
            result, _ = isolated.run(
                f"bench {artifact.format}", _bench, family.workload, out, artifact, layout, options
            )
        else:
            result = _bench(family.workload, out, artifact, layout, options)
        result.format, result.quantization, result.artifact = artifact.format, artifact.quantization, artifact.path
        results.append(result)
        if not (as_json or output_style == "json"):
            title = f"{result.workload.capitalize()} with {out.name} ({artifact.format} {artifact.quantization})"
            report.show(report.bench_table(result, title), output_style)
    result = _fastest(results, found.source.ref, busy) if len(results) > 1 else results[0]
    _write_json(out / "bench.json", result.to_dict())
    if as_json or output_style == "json":
        _print_json(result.to_dict())


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@target_options
@json_option
def check(out, target_name, ram, as_json) -> None:
    """Compare OUT's bench results with a target's budget: exit 0 when every line is met, 1 when one is missed,
    2 when one could not be judged on this machine."""
    from edgeport.machine import machine
    from edgeport.runtime.check import check as judge
    from edgeport.runtime.check import passed, to_dicts, verdict
    from edgeport.runtime.results import BenchResult

    manifest.read(out)
    file = out / "bench.json"
    bench = BenchResult.from_dict(read_json(file, f"run `edgeport bench {out}` first"), file)
    target = targets.load(target_name, ram)
    lines = judge(bench, target, machine())
    if as_json:
        _print_json({"target": target.name, "met": passed(lines), "lines": to_dicts(lines)})
    else:
        report.show(report.check_table(lines, target.name))
    sys.exit(verdict(lines))


@cli.command("report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    "page",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write.",
)
def report_command(inputs, page) -> None:
    """One self-contained HTML page from output folders (manifest and bench result) and fit results (`fit --out`):
    quality and speed against memory per variant with the budget drawn, the plan's prediction beside each
    measurement, parity per artifact, the machine and versions."""
    from edgeport import page as html_page

    if page.exists() and not _written_by_report(page):
        raise EdgeportError(f"-o {page}: the file exists and is not a report edgeport wrote; choose another name")
    outputs, fits = html_page.read_inputs(list(inputs))
    with report.step(f"Drawing {len(fits) * 2 + sum(o.bench is not None for o in outputs)} plots"):
        text = html_page.render(outputs, fits)
    staging = page.with_name(f".{page.name}.tmp")
    staging.write_text(text)
    staging.replace(page)
    report.out.print(f"Wrote {page}")


def _written_by_report(file: Path) -> bool:
    with open(file, "rb") as f:
        return b"<title>edgeport report</title>" in f.read(4096)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@json_option
def inspect(out, as_json) -> None:
    """Print OUT's manifest and verify its files against their recorded hashes."""
    found = manifest.read(out)
    problems = manifest.verify_files(found, out)
    if as_json:
        _print_json({**found.to_dict(), "verification": problems or "ok"})
    else:
        report.show(report.plan_table(found.plan))
        report.show(report.artifacts_table(found))
        report.show(report.provenance_table(found))
        report.out.print("[green]files verified[/]" if not problems else "[red]" + "\n".join(problems))
    if problems:
        sys.exit(MISSED)


def _bench(workload: str, out: Path, artifact, layout, options):
    """One artifact through its family's bench workload (edgeport.runtime.summarize or .transcribe)."""
    import importlib

    return importlib.import_module(f"edgeport.runtime.{workload}").bench_artifact(out, artifact, layout, options)


def _contenders(found, fmt: str | None, out: Path) -> list:
    """What `bench` measures: the artifact `_pick_artifact` gives, or, for a causal LM converted for `host` with no
    --format, every artifact whose engine runs at its speed on this machine's CPU, to race them."""
    from edgeport import layouts
    from edgeport.engines import engine_of, mlx

    if fmt is None and found.target.name == "host" and found.source.model_family.workload == "summarize":
        raced = []
        for artifact in found.artifacts:
            if manifest.missing_files(artifact, out):
                continue
            layout = layouts.read(found.source.family, artifact.format, out / artifact.path)
            slow = layout.engine == "mlx" and mlx.slow_here()
            if layout.shape == "cpu" and not slow and engine_of(layout).unavailable_here() is None:
                raced.append((artifact, layout))
        if len(raced) > 1:
            return raced
    return [_pick_artifact(found, fmt, out)]


BUSY_PERCENT = 25  # CPU taken by other work when a race begins, above which its order is not kept


def _fastest(results: list, model: str, busy: float):
    """The result that decoded fastest (mean over the prompt lengths), the others listed in it. Raced on a quiet
    machine, the host profile orders its formats by these speeds from now on (llama.cpp's threads, which spin while
    they wait, lose most of their speed to other work on the same cores, so a busy race says nothing lasting)."""

    def decode(result) -> float:
        return sum(r.decode_tps for r in result.results) / len(result.results)

    ranked = sorted(results, key=decode, reverse=True)
    best = ranked[0]
    best.raced = [
        {"format": r.format, "quantization": r.quantization, "decode_tps": round(decode(r), 2)} for r in ranked
    ]
    others = ", ".join(f"{r.format} {r.quantization}'s {decode(r):.1f}" for r in ranked[1:])
    said = f"fastest here: {best.format} {best.quantization}, decoding {decode(best):.1f} tok/s against {others}"
    if busy > BUSY_PERCENT:
        report.err.print(
            f"{said}; not kept for `host`: other work took {busy:.0f} % of the CPU when the race began, so bench "
            "again when the machine is quiet",
            soft_wrap=True,
        )
        return best
    speeds = {r.format: decode(r) for r in ranked}
    kept = targets.record_host_race(speeds, model, best.results[0].prompt_tokens)
    report.err.print(
        f"{said}; bench.json holds its figures, and `host` lists {best.format} first from now on (kept in {kept})",
        soft_wrap=True,
    )
    return best


def _pick_artifact(found, fmt: str | None, out: Path):
    """The artifact to bench and its layout: the one of `fmt`, or the fastest of those whose files are intact that
    this machine runs (the CPU shapes where no engine runs an accelerator here, any that runs here, else the
    first)."""
    from edgeport import layouts
    from edgeport.engines import engine_of, mlx

    candidates = [a for a in found.artifacts if fmt is None or a.format == fmt]
    if not candidates:
        have = ", ".join(a.format for a in found.artifacts) or "none"
        raise EdgeportError(f"{out}: no {fmt or ''} artifact to bench (it has: {have})")
    intact = [a for a in candidates if not manifest.missing_files(a, out)]
    if not intact:
        first = candidates[0]
        raise EdgeportError(
            f"{out}: {', '.join(manifest.missing_files(first, out)[:3])} of the {first.format} artifact is missing or "
            f"resized since conversion (`edgeport inspect {out}` checks every file); convert again"
        )
    family = found.source.family
    opened = [(a, layouts.read(family, a.format, out / a.path)) for a in intact]
    if fmt is None:
        runnable = [(a, layout) for a, layout in opened if engine_of(layout).unavailable_here() is None]
        on_cpu = [(a, layout) for a, layout in runnable if layout.shape == "cpu"] if mlx.slow_here() else []
        return (on_cpu or runnable or opened)[0]
    return opened[0]


_stopped_by: list[signal.Signals] = []  # libraries may re-raise a KeyboardInterrupt of their own: remember which


def _read_text(file: Path) -> str:
    from edgeport.headers import regular_file

    try:
        return regular_file(file).read_text()
    except UnicodeDecodeError as e:
        raise EdgeportError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _dict(value) -> dict:
    from dataclasses import asdict

    return asdict(value)


def _interrupt(signum: int, frame) -> None:
    _stopped_by.append(signal.Signals(signum))
    raise KeyboardInterrupt


def _token_counts(value: str) -> list[int]:
    counts = _split(value) or []
    if not counts or not all(c.isdigit() and int(c) > 0 for c in counts):
        raise EdgeportError(f"--prompt-tokens {value}: expected positive numbers separated by commas, e.g. 512,2048")
    return [int(c) for c in counts]


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _write_json(file: Path, data: dict) -> None:
    staging = file.with_suffix(".json.tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    staging.replace(file)
