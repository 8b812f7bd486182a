"""Right-sizing (`edgeport fit`): every quantization of every format a target runs, for one model or several, with
its size, peak memory and expected speed from the plan, whether it meets the target's whole budget, and what it costs
in quality. Quality is measured here where it can be (each variant converted and checked against the source exactly
as `convert` checks it, the figures cached per source and quantization) and otherwise taken from llama.cpp's
published perplexity table, marked as such. Then the best variant that meets the whole budget, and why."""

import json
import math
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from edgeport import __version__, isolated, preflight, quantization, report
from edgeport.build import buildable, check_artifact, convert_step, store_reference
from edgeport.errors import EdgeportError
from edgeport.files import cache_dir, cache_entry, made, read_json
from edgeport.plan import GB, Plan, Step, make_plan, typed_fields
from edgeport.source import Source
from edgeport.targets import Budget, Target

AUTO_MEASURE_SECONDS = 15 * 60  # --quality auto measures a model when the preflight predicts at most this here
LOSS_RESOLUTION = 0.01  # losses closer than this (1 % perplexity, 0.01 WER) rank alike; then the faster wins
# Published figures only: a larger model's variant is preferred while it loses at most this much perplexity. The
# same scoreboard shows why: Llama 3 70B at q4_K_M (3.19) is far below 8B at f16 (6.77), as k-quants' pull request
# (ggml-org/llama.cpp#1684) showed for 13B at 3 bits against 7B at 16.
LARGER_MODEL_LOSS = 0.10
PARITY_LEVEL = "full"  # the same inputs convert checks with, so a fit row and a manifest agree


@dataclass
class Quality:
    origin: str  # "measured" (here, as convert's parity) | "published" (llama.cpp's table) | "unknown"
    loss: float | None  # causal LM: relative perplexity increase over the source; Whisper: absolute WER increase
    note: str  # where the figure comes from, or why there is none
    top1_agreement: float | None = None
    kl_mean: float | None = None
    # Measured: bits per UTF-8 byte of the parity text (causal LM) or WER on the parity clips (Whisper): lower is
    # better, and comparable across models (and tokenizers) of one task.
    absolute: float | None = None
    parity: str | None = None  # measured: passed | failed against the bounds convert applies
    like: str | None = None  # published: the llama.cpp type whose figure this is


@dataclass
class Variant:
    model: str
    params: int
    step: Step
    quality: Quality

    @property
    def label(self) -> str:
        return f"{self.step.format} {self.step.quantization}"


@dataclass
class Fit:
    target: str
    task: str  # summarize | transcribe
    budget: Budget  # the target's, with the peak memory budget filled in (the RAM an app may use, if none)
    variants: list[Variant]
    recommended: int | None  # index into variants; None when none meets the whole budget
    reason: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this fit, measurements included
    version: str = __version__

    @property
    def pick(self) -> Variant | None:
        return None if self.recommended is None else self.variants[self.recommended]

    def to_dict(self) -> dict:
        return {"kind": "edgeport-fit", **asdict(self)}

    @classmethod
    def from_dict(cls, data, where: str) -> "Fit":
        """A fit read back from JSON (`fit --out`), each field checked against its declared type."""
        if not isinstance(data, dict) or data.get("kind") != "edgeport-fit":
            raise EdgeportError(f"{where}: not a fit result (write one with `edgeport fit … --out FILE`)")
        variants = data.get("variants")
        if not isinstance(variants, list):
            raise EdgeportError(f"{where}: variants is missing or not a list")
        read = []
        for i, v in enumerate(variants):
            at = f"{where}.variants[{i}]"
            fields = typed_fields(Variant, v, at, skip=("step", "quality"))
            step = Step(**typed_fields(Step, v.get("step"), f"{at}.step"))
            quality = Quality(**typed_fields(Quality, v.get("quality"), f"{at}.quality"))
            read.append(Variant(**fields, step=step, quality=quality))
        budget = Budget(**typed_fields(Budget, data.get("budget"), f"{where}.budget"))
        fit = cls(**typed_fields(cls, data, where, skip=("variants", "budget")), budget=budget, variants=read)
        if fit.task not in ("summarize", "transcribe"):
            raise EdgeportError(f"{where}: task must be summarize or transcribe")
        if any(v.quality.origin not in ("measured", "published", "unknown") for v in read):
            raise EdgeportError(f"{where}: a variant's quality.origin must be measured, published or unknown")
        if fit.recommended is not None and not 0 <= fit.recommended < len(read):
            raise EdgeportError(f"{where}: recommended {fit.recommended} is not a variant's index")
        return fit


def sweep(source: Source, target: Target) -> Plan:
    """The plan of every quantization the source's family builds for each format the target runs."""
    family = source.family
    plan = make_plan(source, target)
    size = family.size(source.config)
    plan.steps = [
        family.step(size, target, pref.name, quant, pref.unit)
        for pref in family.formats(target)
        for quant in family.quantizations(pref.name, pref.unit)
    ]
    return plan


def fit(sources: list[Source], target: Target, mode: str = "auto") -> Fit:
    """Sweep each of `sources` on `target`, judge each variant's quality (`mode`: auto, measured or published, see
    `qualities`) and recommend the best variant that meets the whole budget."""
    start = time.perf_counter()
    variants, notes = [], []
    for source in sources:
        plan = sweep(source, target)
        found, said = qualities(source, target, plan, mode)
        notes += said
        variants += [Variant(source.ref, plan.params, step, found[_key(step)]) for step in plan.steps]
    if any(v.quality.origin == "published" for v in variants):
        table = _table()
        notes.append(f"published figures: {table['source']}; a model much smaller than {table['model']} loses more")
    recommended, reason = recommend(variants)
    return Fit(
        target=target.name,
        task=sources[0].family.workload,
        budget=replace(target.budget, peak_memory_gb=round(target.peak_memory_budget_gb, 2)),
        variants=variants,
        recommended=recommended,
        reason=reason,
        notes=notes,
        seconds=round(time.perf_counter() - start, 2),
    )


def qualities(source: Source, target: Target, plan: Plan, mode: str) -> tuple[dict[str, Quality], list[str]]:
    """Each step's quality, and notes on how it was had. `measured`: every variant this machine can build is
    converted and checked (the source's weights are downloaded if they are not here yet); `published`: llama.cpp's
    table; `auto`: measured when the weights are here and the preflight predicts at most AUTO_MEASURE_SECONDS for
    what is not cached yet, else published. Cached measurements are used whatever the mode but `published`."""
    family, name = source.family, source.name
    found = {_key(step): published(family.name, step.quantization) for step in plan.steps}
    if mode == "published":
        return found, [f"{name}: quality as published (--quality published)"]
    if mode == "auto" and source.kind == "hf-hub" and source.fills_cache:
        return found, [
            f"{name}: its weights are not on this machine, so quality is as published (--quality measured "
            "downloads them and measures each variant)"
        ]
    steps, not_built = buildable(plan, family)
    fitting_the_target = {_key(s) for s in plan.steps if s.fits}
    for skipped in not_built:
        key = f"{skipped.format} {skipped.quantization}"
        if key in fitting_the_target:  # it cannot be built here: nothing to measure, nothing to publish
            found[key] = Quality("unknown", None, f"not built here: {skipped.reason}")
        else:  # too large for the target: not worth measuring, but what it would cost is still worth knowing
            found[key].note += " (not measured: it does not fit the target)"
    folder = _cache_folder(source)
    cached = {_key(s): _read_cached(folder, s) for s in steps}
    found |= {key: quality for key, quality in cached.items() if quality}
    todo = [s for s in steps if not cached[_key(s)]]
    if not todo:
        return found, []
    model = preflight.model_of(source, plan.context_length, target)
    reference_here = (folder / "reference").is_dir()
    estimates = [
        e
        for e in preflight.estimate(model, todo, PARITY_LEVEL)
        if not (reference_here and e.step == "parity reference")
    ]
    seconds = sum(e.seconds for e in estimates)
    if mode == "auto" and seconds > AUTO_MEASURE_SECONDS:
        return found, [
            f"{name}: measuring {len(todo)} variants here would take about {seconds / 60:.0f} min, so their "
            "quality is as published (--quality measured measures them, once: the figures are cached)"
        ]
    room = preflight.Room.here(Path(tempfile.gettempdir()), cache=source.fills_cache)
    kept, left_out = preflight.fitting(estimates, room, asked=False)
    for step in todo:
        if step.format in left_out:
            found[_key(step)].note += f" (not measured: {left_out[step.format]})"
    todo = [s for s in todo if s.format not in left_out]
    start = time.perf_counter()
    found |= _measure(source, target, todo, folder, [e for e in kept if e.format not in left_out])
    took = time.perf_counter() - start
    return found, [f"{name}: {len(todo)} variants measured here in {took / 60:.1f} min (cached for the next fit)"]


def _measure(source: Source, target: Target, steps: list[Step], folder: Path, estimates) -> dict[str, Quality]:
    """Convert each step into a temporary folder and check it against the source's reference (computed once and
    cached), each in a process of its own as `build` does; cache each quality."""
    from edgeport.source import open_source

    if source.path is None:  # opened for its config: now its weights
        with report.step(f"Opening {source.name}"):
            source = open_source(source.ref, revision=source.revision, trust_remote_code=source.trust_remote_code)
    found = {}
    reference = folder / "reference"
    with report.WorkProgress(estimates) as progress:
        if not reference.is_dir():
            what = f"Running {source.name} in transformers for the reference"
            with progress.step("parity reference", what), cache_entry(reference) as staging:
                isolated.run("parity reference", _store_reference, source, staging)
        text = (
            read_json(reference / TEXT_FILE, "the reference's text size") if source.family.name == "causal-lm" else {}
        )
        for step in steps:
            name = f"{step.format} {step.quantization}"
            with tempfile.TemporaryDirectory(prefix="edgeport-fit-") as scratch:
                try:
                    with progress.step(f"convert {name}", f"Converting to {name}"):
                        artifact, _ = isolated.run(
                            f"convert {name}", convert_step, source, step, target, Path(scratch) / step.format
                        )
                    with progress.step(f"parity {name}", f"Parity of {name} against the source"):
                        parity, _ = isolated.run(f"parity {name}", check_artifact, source, artifact, reference)
                    quality = measured(parity, text)
                except EdgeportError as e:  # not cached: memory or disk may be there next time
                    quality = Quality("unknown", None, f"not built here: {e}")
            found[_key(step)] = quality
            if quality.origin == "measured":
                _write_cached(folder, step, quality)
    return found


TEXT_FILE = "text.json"


def _store_reference(source: Source, folder: Path) -> None:
    """The source's reference outputs, and (causal LM) the parity text's length in tokens and UTF-8 bytes, which
    bits per byte needs."""
    store_reference(source, PARITY_LEVEL, folder)
    if source.family.name == "causal-lm":
        ids = source.family.read_reference(folder).text
        scored = source.tokenizer.decode(ids[1:])  # every token but the first is predicted
        (folder / TEXT_FILE).write_text(json.dumps({"tokens": len(ids), "bytes": len(scored.encode())}))


def measured(parity, text: dict) -> Quality:
    """A variant's quality from its parity check."""
    m = parity.metrics
    note = "measured here: " + parity.method
    if "wer_delta" in m:
        return Quality("measured", m["wer_delta"], note, absolute=m["wer_artifact"], parity=parity.status)
    if "ppl_delta" not in m:
        return Quality("unknown", None, "not measured: " + "; ".join(parity.not_checked or [parity.status]))
    bits_per_byte = math.log2(m["ppl_artifact"]) * (text["tokens"] - 1) / text["bytes"] if text else None
    return Quality(
        "measured",
        m["ppl_delta"],
        note,
        top1_agreement=m["top1_agreement"],
        kl_mean=m["kl_mean"],
        absolute=round(bits_per_byte, 4) if bits_per_byte else None,
        parity=parity.status,
    )


def published(family: str, quant_name: str) -> Quality:
    """What llama.cpp's LLaMA 3 8B scoreboard says the nearest llama.cpp type costs (edgeport/data/quality.toml)."""
    if family != "causal-lm":
        return Quality("unknown", None, "no published table for Whisper; --quality measured measures it")
    table = _table()
    quant = quantization.lookup(quant_name)
    nearest = table["nearest"].get(quant.name if quant else quant_name)
    if nearest is None:
        return Quality(
            "unknown", None, f"no published figure for {quant_name}'s scheme; --quality measured measures it"
        )
    row = table["types"][nearest]
    loss = row["ppl"] / table["base_ppl"] - 1
    weights_only = "; weights only: the 16-bit activations' rounding is not counted" if quant.activation_bits else ""
    note = f"published: as llama.cpp {nearest} on {table['model']}{weights_only}"
    return Quality("published", round(loss, 4), note, kl_mean=row["kld"], like=nearest)


def recommend(variants: list[Variant]) -> tuple[int | None, str]:
    """The best variant that meets the whole budget, and why. Quality first: between several models, the lowest
    measured bits per byte where every candidate was measured, else the largest model that has a candidate losing at
    most LARGER_MODEL_LOSS; then the least loss. Of the candidates within LOSS_RESOLUTION of the best, the fastest:
    a quality difference that small does not pay for a slower, larger variant."""
    meeting = [v for v in variants if v.step.meets_budget]
    meeting = [v for v in meeting if v.quality.parity != "failed"] or meeting  # outside convert's bounds: last
    several = len({v.model for v in variants}) > 1
    if not meeting:
        closest = min(variants, key=lambda v: (not v.step.fits, len(v.step.misses.split("; ")), -_speed(v.step)))
        return None, f"none meets the whole budget; closest: {_name(closest, several)} ({closest.step.misses})"
    if several and all(v.quality.absolute is not None for v in meeting):
        quality, basis = (lambda v: v.quality.absolute), "the lowest measured bits per byte"
    else:
        quality, basis = (lambda v: v.quality.loss), "the least quality lost"
        if several:
            larger = [v for v in meeting if v.quality.loss is not None and v.quality.loss <= LARGER_MODEL_LOSS]
            if larger:
                largest = max(v.params for v in larger)
                meeting = [v for v in meeting if v.params == largest]
                basis = f"the largest model losing at most {LARGER_MODEL_LOSS:.0%}, then the least quality lost"
    known = [v for v in meeting if quality(v) is not None]
    if known:
        best = min(quality(v) for v in known)
        pick = max((v for v in known if quality(v) <= best + LOSS_RESOLUTION), key=lambda v: _speed(v.step))
    else:  # nothing to judge quality by: the most bits a weight, the least rounding
        pick = max(meeting, key=lambda v: (_bits(v.step), _speed(v.step)))
        basis = "no quality known: the most bits a weight"
    reason = f"{_name(pick, several)}: {describe(pick)} ({basis} among those that meet the budget, then the fastest)"
    better = [
        v
        for v in variants
        if not v.step.meets_budget
        and v.model == pick.model
        and None not in (v.quality.loss, pick.quality.loss)
        and v.quality.loss < pick.quality.loss - LOSS_RESOLUTION
    ]
    if better:
        reason += "; " + "; ".join(f"{v.label} {v.step.misses.split('; ')[0]}" for v in better[:2])
    return variants.index(pick), reason


def describe(v: Variant) -> str:
    """A variant in one line: its quality, size and speed."""
    q, s = v.quality, v.step
    if q.loss is None:
        quality = "quality unknown"
    else:
        kind = "WER" if s.rtf is not None else "perplexity"
        figure = f"{q.loss:+.3f} {kind}" if s.rtf is not None else f"{q.loss:+.1%} {kind}"
        quality = figure + (" (published)" if q.origin == "published" else "")
    speed = f"RTF {s.rtf:.3f}" if s.rtf is not None else f"{s.decode_tps:,.0f} tok/s"
    return f"{quality}, {s.weight_bytes / GB:.2f} GB, {speed}"


def _name(v: Variant, several: bool) -> str:
    return f"{Path(v.model).name} {v.label}" if several else v.label


def _bits(step: Step) -> float:
    return quantization.get(step.quantization, step.format).bits_per_weight()


def _speed(step: Step) -> float:
    return -step.rtf if step.rtf is not None else step.decode_tps


def _key(step: Step) -> str:
    return f"{step.format} {step.quantization}"


def _cache_folder(source: Source) -> Path:
    """Where a source's measurements are kept: by its weights' hashes (or a hub id and revision) and this version of
    edgeport, whose converters made them."""
    import hashlib

    identity = source.origin_sha256() if source.origin_files else {"ref": source.ref, "revision": source.revision}
    key = json.dumps({"source": identity, "version": __version__, "level": PARITY_LEVEL}, sort_keys=True)
    return made(cache_dir() / "fit" / f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def _cache_file(folder: Path, step: Step) -> Path:
    return folder / f"{step.format}-{step.quantization}-{step.unit}.json"


def _read_cached(folder: Path, step: Step) -> Quality | None:
    file = _cache_file(folder, step)
    if not file.is_file():
        return None
    try:
        return Quality(**typed_fields(Quality, json.loads(file.read_text()), str(file)))
    except (EdgeportError, ValueError):
        return None  # a damaged entry is measured again


def _write_cached(folder: Path, step: Step, quality: Quality) -> None:
    file = _cache_file(folder, step)
    staging = file.with_suffix(".tmp")
    staging.write_text(json.dumps(asdict(quality), indent=2))
    staging.replace(file)


def _table() -> dict:
    return tomllib.loads(resources.files("edgeport.data").joinpath("quality.toml").read_text())
