"""Source x Target -> Plan: what to build for a device, and what it will cost there. The figures of each step come
from the source's family (edgeport.families), where its formulas are written out."""

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import get_args, get_origin, get_type_hints

from edgeport import quantization
from edgeport.errors import EdgeportError
from edgeport.source import Source
from edgeport.targets import Target

NORM_BYTES_PER_VALUE = 2
GB = 1e9


@dataclass
class Step:
    format: str
    quantization: str
    unit: str
    weight_bytes: int
    kv_bytes: int
    peak_bytes: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    fits: bool
    verdict: str  # why it fits or does not, in words
    largest_fitting: str | None  # the largest quantization of this format that fits
    rtf: float | None = None  # Whisper: predicted wall time / audio duration (prefill_tps is encoder frames/s)
    meets_budget: bool | None = None  # memory and every speed budget met (None: a plan from before it was judged)
    prefill_roofline_tps: float | None = None  # what the expected prefill_tps is a calibrated share of
    decode_roofline_tps: float | None = None
    calibration: str | None = None  # which measurements calibrated the expected speeds, in words
    gpu_layers: int | None = None  # llama.cpp's n_gpu_layers, on a target with a discrete GPU
    vram_bytes: int | None = None  # what those layers hold in the GPU's memory
    misses: str = ""  # the budget lines missed, in words ("" when the whole budget is met)


@dataclass(frozen=True)
class Footprint:
    """What converting a model holds at once beside its weights, for the preflight (edgeport.preflight): the largest
    block of weights (a layer, or the embedding or output projection where larger), the largest the paged reference
    holds at a time (it reads the vocabulary's tables a slice at a time), whether it can page at all, a float32 KV
    cache over the context, the largest part a converter that works part by part builds at once (Core ML's chunks),
    the largest unit the NPU shape's converter exports, calibrates and quantizes at once, and the largest part of the
    NPU shape as built for the target, by quantization (its parity runs a part at a time)."""

    block_params: int
    paged_params: int
    pageable: bool
    cache_bytes: int
    part_params: int
    unit_params: int
    npu_part_params: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    source: str
    model_type: str
    params: int
    active_params: int
    target: str
    ram_gb: float
    usable_ram_gb: float
    bandwidth_gbs: float
    context_length: int
    prompt_tokens: int  # Whisper: 0 (it is planned per 30 s window)
    steps: list[Step]
    family: str = "causal-lm"
    source_quantization: str | None = None  # how the source's weights arrive quantized, in words; None: floats
    source_bits: float | None = None  # the bits a weight they are stored in, scales included

    def step(self, fmt: str) -> Step:
        return next(s for s in self.steps if s.format == fmt)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        """A plan read back from JSON (a manifest), each field checked against the type it is declared with."""
        steps = data.get("steps") if isinstance(data, dict) else None
        if not isinstance(steps, list):
            raise EdgeportError(f"{where}: steps is missing or not a list")
        steps = [Step(**typed_fields(Step, step, f"{where}.steps[{i}]")) for i, step in enumerate(steps)]
        return cls(**typed_fields(cls, data, where, skip=("steps",)), steps=steps)


def typed_fields(cls, data, where: str, skip: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass `cls` found in `data`, each of its declared type (a float may be given as an int; a
    list or a dict is checked as one, not its items)."""
    if not isinstance(data, dict):
        raise EdgeportError(f"{where}: not an object")
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in skip or (f.name not in data and (f.default is not MISSING or f.default_factory is not MISSING)):
            continue
        hint = hints[f.name]
        allowed = (get_origin(hint),) if get_origin(hint) in (list, dict) else get_args(hint) or (hint,)
        allowed = (*allowed, int) if float in allowed else allowed
        value = data.get(f.name, MISSING)
        if not any(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) for kind in allowed):
            raise EdgeportError(
                f"{where}: field {f.name} is missing or not a {' or '.join(a.__name__ for a in allowed)}"
            )
        values[f.name] = value
    return values


def make_plan(source: Source, target: Target, formats: list[str] | None = None, quant: str | None = None) -> Plan:
    """Plan `source` for `target`: the target's formats (or `formats`), each at its preferred quantization
    (or `quant` wherever that quantization exists)."""
    family = source.family
    size = family.size(source.config)
    offered = family.formats(target)
    preferences = [f for f in offered if formats is None or f.name in formats]
    if not preferences:
        names = ", ".join(f.name for f in offered)
        raise EdgeportError(f"--formats {','.join(formats or [])}: {target.name} {family.runs} {names}")
    chosen = quantization.lookup(quant) if quant else None
    quant_formats = chosen.formats if chosen else ()
    if quant and not any(pref.name in quant_formats for pref in preferences):
        valid = sorted(
            {q.name for q in quantization.QUANTIZATIONS.values() for p in preferences if p.name in q.formats}
        )
        raise EdgeportError(
            f"--quant {quant}: not available for {', '.join(p.name for p in preferences)}; "
            f"choose one of: {', '.join(valid)}"
        )
    steps = [
        family.step(size, target, pref.name, quant if pref.name in quant_formats else pref.quantization, pref.unit)
        for pref in preferences
    ]
    return Plan(
        source=source.ref,
        model_type=source.model_type,
        params=size.params,
        active_params=size.active_params,
        target=target.name,
        ram_gb=target.ram_gb,
        usable_ram_gb=round(target.usable_ram_gb, 2),
        bandwidth_gbs=target.bandwidth_gbs,
        context_length=family.context_length(source, target),
        prompt_tokens=family.prompt_tokens(target),
        steps=steps,
        family=family.name,
        source_quantization=source.quantized.describe() if source.quantized else None,
        source_bits=round(source.quantized.bits, 3) if source.quantized else None,
    )


def room_text(peak: int, target: Target) -> str:
    """A step's memory in words: its peak against what an app may use on the target."""
    return f"{peak / GB:.2f} GB of the {target.usable_ram_gb:.1f} GB an app may use on {target.ram_gb:g} GB"
