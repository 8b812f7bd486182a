"""Target devices: one TOML file each beside this module, validated on load.

`host` is this machine: its RAM and cores are read, its memory bandwidth and matmul throughput are
measured once and cached.
"""

import difflib
import json
import os
import time
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from edgeport import quantization
from edgeport.errors import EdgeportError
from edgeport.files import cache_dir, made, read_json
from edgeport.machine import CPU_ARCHS, cpu_arch

UNITS = ("cpu", "gpu", "npu")
SPREAD_LIMIT = 1.5  # slowest repeat of a host measurement over the fastest, beyond which something else was running
_THIS_RUN: dict[str, dict] = {}  # host figures measured by this process, so that it measures once
FORMATS = ("mlx", "coreml", "onnx", "gguf", "ct2")


@dataclass(frozen=True)
class FormatPreference:
    name: str  # mlx | coreml | onnx | ct2
    quantization: str  # the quantization this device wants for it (plan.QUANTIZATIONS)
    unit: str  # the compute unit it runs on: cpu | gpu | npu


@dataclass(frozen=True)
class Budget:
    """What a user of this device expects; None means no budget for that figure."""

    prompt_tokens: int  # the prompt length the TTFT budget is set for
    ttft_s: float | None
    decode_tps: float | None
    rtf: float | None  # transcription: wall time / audio duration, at most
    wer: float | None  # transcription: word error rate on the user's reference, at most
    peak_memory_gb: float | None  # None: the RAM an app may use


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    ram_gb: float
    ram_options_gb: tuple[float, ...]
    usable_ram_fraction: float  # share of RAM one app may hold before the OS stops it
    bandwidth_gbs: float
    tflops: dict[str, float]  # dense throughput per unit at the precision formats compute in there (NPU: 16-bit)
    context_length: int
    formats: tuple[FormatPreference, ...]  # what a causal LM is built as, most wanted first
    speech_formats: tuple[FormatPreference, ...]  # what Whisper is built as
    budget: Budget
    measured: bool = False  # figures measured on this machine rather than taken from a spec sheet
    aihub_device: str | None = None  # the Qualcomm AI Hub device that stands for this target
    coreml_deployment: str | None = None  # the oldest OS an app ships to, e.g. iOS18: what Core ML may use
    coreml_chunk_gb: float | None = None  # the most weights one .mlpackage may hold there (the Neural Engine's limit)
    qnn_part_gb: float | None = None  # the most weights one part of the NPU shape may hold (one QNN context binary)
    vram_gb: float | None = None  # a discrete GPU's own memory: llama.cpp splits the layers between it and RAM
    vram_bandwidth_gbs: float | None = None
    pcie_gbs: float | None = None  # the link from RAM to that GPU, one way: prompt batches copy RAM's layers over it
    cpu_arch: str | None = None  # the CPU's instruction set (arm64, x86_64) where it differs from this machine's

    def backend(self, unit: str) -> str | None:
        """What runs a GPU or CPU engine's kernels here (llama.cpp builds for each): Metal on a Mac's GPU, CUDA on a
        GeForce card, the target's CPU instruction set on its cores (this machine's, for `host`); None for an NPU,
        whose engines are each one vendor's."""
        if unit == "gpu":
            return "CUDA" if self.vram_gb else "Metal"
        return self.cpu_arch or cpu_arch() if unit == "cpu" else None

    @property
    def usable_ram_gb(self) -> float:
        return self.ram_gb * self.usable_ram_fraction

    @property
    def peak_memory_budget_gb(self) -> float:
        return self.budget.peak_memory_gb or self.usable_ram_gb

    def with_ram(self, ram_gb: float | None) -> "Target":
        if ram_gb is None:
            return self
        if ram_gb not in self.ram_options_gb:
            options = ", ".join(f"{r:g}" for r in self.ram_options_gb)
            raise EdgeportError(f"--ram {ram_gb:g}: {self.name} comes with {options} GB")
        return replace(self, ram_gb=ram_gb)

    def with_context(self, tokens: int | None) -> "Target":
        """This target with a KV cache of `tokens` instead of the profile's context length."""
        if tokens is None:
            return self
        if tokens <= self.budget.prompt_tokens:
            raise EdgeportError(
                f"--context {tokens}: must exceed the {self.budget.prompt_tokens}-token prompt that {self.name}'s "
                "TTFT budget is set for"
            )
        return replace(self, context_length=tokens)


def names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _profiles().iterdir() if p.name.endswith(".toml"))


def load(name: str, ram_gb: float | None = None, context: int | None = None) -> Target:
    """The target called `name`, or the profile in the TOML file `name` (a device of the user's own, validated
    like the bundled ones); a misspelt name gets the closest one and the list."""
    if name.endswith(".toml"):
        return _load_file(Path(name)).with_ram(ram_gb).with_context(context)
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise EdgeportError(f"unknown target '{name}': {hint}known targets: {', '.join(known)}")
    file = _profiles() / f"{name}.toml"
    target = parse(tomllib.loads(file.read_text()), source=f"targets/{name}.toml")
    if name == "host":
        target = _measure_host(target)
    return target.with_ram(ram_gb).with_context(context)


def _load_file(file: Path) -> Target:
    if not file.is_file():
        raise EdgeportError(f"-t {file}: no such target file (give a bundled target's name, or a .toml profile)")
    try:
        data = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeportError(f"{file}: not a valid TOML file ({e})") from e
    return parse(data, source=str(file))


def parse(data: dict, source: str) -> Target:
    """Validate one profile; every problem names the file and the field."""

    def need(table: dict, key: str, kind: type | tuple, where: str = ""):
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EdgeportError(f"{source}: field {where}{key} is missing or not a {_kind_name(kind)}")
        return value

    number = (int, float)
    ram_options = tuple(float(r) for r in need(data, "ram_gb", list))
    default_ram = float(need(data, "default_ram_gb", number))
    if default_ram not in ram_options:
        raise EdgeportError(f"{source}: default_ram_gb {default_ram:g} is not one of ram_gb")
    fraction = float(need(data, "usable_ram_fraction", number))
    if not 0 < fraction <= 1:
        raise EdgeportError(f"{source}: usable_ram_fraction must be in (0, 1]")
    tflops = need(data, "tflops", dict)
    if not tflops or set(tflops) - set(UNITS) or not all(isinstance(v, number) for v in tflops.values()):
        raise EdgeportError(f"{source}: tflops must map some of {', '.join(UNITS)} to numbers")

    def preferences(key: str) -> tuple[FormatPreference, ...]:
        found = []
        for i, entry in enumerate(need(data, key, list)):
            where = f"{key}[{i}]."
            fmt = FormatPreference(
                need(entry, "name", str, where),
                need(entry, "quantization", str, where),
                need(entry, "unit", str, where),
            )
            if fmt.name not in FORMATS:
                raise EdgeportError(f"{source}: {where}name '{fmt.name}' is not one of {', '.join(FORMATS)}")
            known = quantization.lookup(fmt.quantization)
            if known is None or fmt.name not in known.formats:
                raise EdgeportError(f"{source}: {where}quantization '{fmt.quantization}' is not one for {fmt.name}")
            if fmt.unit not in tflops:
                raise EdgeportError(f"{source}: {where}unit '{fmt.unit}' has no tflops figure")
            found.append(fmt)
        if not found:
            raise EdgeportError(f"{source}: {key} is empty")
        return tuple(found)

    gpu_keys = ("vram_gb", "vram_bandwidth_gbs", "pcie_gbs")
    if any(key in data for key in gpu_keys) and not all(key in data for key in gpu_keys):
        raise EdgeportError(f"{source}: a discrete GPU needs all of vram_gb, vram_bandwidth_gbs and pcie_gbs")
    budget = need(data, "budget", dict)

    def optional(key: str) -> float | None:
        value = budget.get(key)
        if value is not None and (not isinstance(value, number) or value <= 0):
            raise EdgeportError(f"{source}: budget.{key} must be a positive number")
        return None if value is None else float(value)

    return Target(
        name=need(data, "name", str),
        description=need(data, "description", str),
        ram_gb=default_ram,
        ram_options_gb=ram_options,
        usable_ram_fraction=fraction,
        bandwidth_gbs=float(need(data, "bandwidth_gbs", number)),
        tflops={unit: float(v) for unit, v in tflops.items()},
        context_length=need(data, "context_length", int),
        formats=preferences("formats"),
        speech_formats=preferences("speech_formats"),
        aihub_device=_optional_string(data, "aihub_device", source),
        coreml_deployment=_optional_string(data, "coreml_deployment", source),
        coreml_chunk_gb=_optional_positive(data, "coreml_chunk_gb", source),
        qnn_part_gb=_optional_positive(data, "qnn_part_gb", source),
        vram_gb=_optional_positive(data, "vram_gb", source),
        vram_bandwidth_gbs=_optional_positive(data, "vram_bandwidth_gbs", source),
        pcie_gbs=_optional_positive(data, "pcie_gbs", source),
        cpu_arch=_optional_choice(data, "cpu_arch", CPU_ARCHS, source),
        budget=Budget(
            prompt_tokens=need(budget, "prompt_tokens", int, "budget."),
            ttft_s=optional("ttft_s"),
            decode_tps=optional("decode_tps"),
            rtf=optional("rtf"),
            wer=optional("wer"),
            peak_memory_gb=optional("peak_memory_gb"),
        ),
    )


def _optional_string(data: dict, key: str, source: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise EdgeportError(f"{source}: field {key} must be a string")
    return value


def _optional_choice(data: dict, key: str, choices: tuple[str, ...], source: str) -> str | None:
    value = _optional_string(data, key, source)
    if value is not None and value not in choices:
        raise EdgeportError(f"{source}: field {key} must be one of {', '.join(choices)}, not {value}")
    return value


def _optional_positive(data: dict, key: str, source: str) -> float | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        raise EdgeportError(f"{source}: field {key} must be a positive number")
    return None if value is None else float(value)


def _measure_host(target: Target) -> Target:
    import psutil

    facts = host_facts()
    ram = round(psutil.virtual_memory().total / 2**30, 1)
    raced = host_race()
    formats, ranked = target.formats, ""
    if raced:  # the formats `edgeport bench` raced here, fastest first; the others after, in the profile's order
        order = sorted(raced["decode_tps"], key=raced["decode_tps"].get, reverse=True)
        formats = tuple(sorted(formats, key=lambda f: order.index(f.name) if f.name in order else len(order)))
        speeds = ", ".join(f"{name} {raced['decode_tps'][name]:g}" for name in order)
        ranked = f"; formats in the order `edgeport bench` found fastest here (decode tok/s: {speeds})"
    return replace(
        target,
        ram_gb=ram,
        ram_options_gb=(ram,),
        bandwidth_gbs=facts["bandwidth_gbs"],
        tflops={"cpu": facts["cpu_tflops"]},
        formats=formats,
        measured=True,
        description=f"{target.description} ({os.cpu_count()} cores, {ram:g} GB){ranked}",
    )


def _machine_key() -> str:
    import platform

    return f"{platform.node()}-{platform.machine()}-{os.cpu_count()}"


def host_race() -> dict | None:
    """The decode speeds `edgeport bench` last measured here for each host format, raced on one output, or None."""
    try:
        race = read_json(cache_dir() / "host-race.json", "")
    except EdgeportError:
        return None
    speeds = race.get("decode_tps") if isinstance(race, dict) and race.get("key") == _machine_key() else None
    valid = (
        isinstance(speeds, dict)
        and speeds
        and all(
            isinstance(name, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            for name, v in speeds.items()
        )
    )
    return race if valid else None


def record_host_race(decode_tps: dict[str, float], model: str, prompt_tokens: int) -> Path:
    """Keep what a race of the host formats measured, so that `host` lists the fastest first from now on."""
    file = cache_dir() / "host-race.json"
    made(file.parent)
    race = {
        "key": _machine_key(),
        "decode_tps": {name: round(v, 2) for name, v in decode_tps.items()},
        "model": model,
        "prompt_tokens": prompt_tokens,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    file.write_text(json.dumps(race, indent=2))
    return file


def host_facts(remeasure: bool = False) -> dict:
    """Memory bandwidth and fp32 matmul throughput of this machine, measured once (or again, `remeasure`) and
    cached. Figures whose repeats spread wider than SPREAD_LIMIT were taken while something else ran: they are used
    for this run, said to be, and not cached."""
    import numpy as np

    from edgeport.report import err

    cache = cache_dir() / "host.json"
    key = _machine_key()
    facts = None if remeasure else _THIS_RUN.get(key) or _cached_facts(cache)
    if facts and facts["key"] == key:
        return facts
    err.print(
        f"measuring this machine's memory bandwidth and matmul throughput (a few seconds; kept in {cache})",
        soft_wrap=True,
    )
    src = np.ones(2**27, dtype=np.float32)  # 512 MiB
    dst = np.empty_like(src)
    copies = _times(5, lambda: np.copyto(dst, src))
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    matmuls = _times(7, lambda: a @ a)
    spread = max(max(copies) / min(copies), max(matmuls) / min(matmuls))
    facts = {
        "key": key,
        "bandwidth_gbs": round(2 * src.nbytes / min(copies) / 1e9, 1),  # a copy reads and writes each byte
        "cpu_tflops": round(2 * 1024**3 / min(matmuls) / 1e12, 3),
        "spread": round(spread, 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _THIS_RUN[key] = facts
    if spread > SPREAD_LIMIT:
        err.print(
            f"[yellow]warning:[/] this machine's repeats differed by {spread:.1f}x, so something else is running: "
            "its figures are used for now but not kept; run `edgeport targets --measure` when it is quiet",
            soft_wrap=True,
        )
        return facts
    made(cache.parent)
    cache.write_text(json.dumps(facts, indent=2))
    return facts


def _cached_facts(cache: Path) -> dict | None:
    """The host figures measured before, or None when there are none or the file is not as this edgeport writes
    it (then they are measured again)."""
    try:
        facts = read_json(cache, "")
    except EdgeportError:
        return None
    valid = isinstance(facts, dict) and isinstance(facts.get("key"), str)
    numbers = valid and all(
        isinstance(facts.get(k), int | float) and not isinstance(facts.get(k), bool) and facts[k] > 0
        for k in ("bandwidth_gbs", "cpu_tflops")
    )
    return facts if numbers else None


def _times(n: int, fn) -> list[float]:
    """Seconds of `n` calls of `fn`, after one that warms caches and thread pools."""
    times = []
    for _ in range(n + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[1:]


def _profiles() -> Path:
    return Path(str(resources.files(__name__)))


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"int": "number", "float": "number", "str": "string", "list": "list", "dict": "table"}[k.__name__]
        for k in kinds
    )
