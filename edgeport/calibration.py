"""What real engines reach of the plan's rooflines, fitted from measurements with their sources
(data/measurements.toml: published figures, and edgeport bench on this repository's CI machine).

A decoded token reads the weights and the KV cache once, so its roofline is the device's bandwidth over those bytes;
a prompt token costs two operations a parameter, so prefill's roofline is the compute unit's throughput over that.
Real engines reach a share of each, and a decoded token also pays a fixed cost (kernel launches, synchronisation,
sampling) that weighs most on small models. Per engine (a format on a compute unit):

- decode seconds a token = roofline seconds / decode efficiency + fixed seconds a token
- prefill tok/s          = compute roofline x prefill efficiency
- Whisper's RTF          = its RTF at the rooflines / transcription efficiency (an engine without transcription
                           rows: its decode and prefill efficiencies, each on its part)

both fitted by least squares on the relative error over the engine's rows (the fixed cost only where at least
FIXED_COST_ROWS rows say so). A backend (llama.cpp on Metal or on CUDA, on x86-64 or Arm cores) with DEVICE_ROWS
decode rows gets its own fit where the engine's rows span more than one, and so does a device with as many: the plan
takes the device's, else its backend's, else the engine's, each kind (decode, prefill, transcription) from the
narrowest fit that has rows of it. An engine with no decode or prefill row borrows that share from the other engines
on its unit, and says it is a guess; with none there either, it keeps its rooflines, and says so."""

import math
import tomllib
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from edgeport import quantization
from edgeport.errors import EdgeportError

FIXED_COST_ROWS = 3
DEVICE_ROWS = 3
METRICS = ("decode_tps", "prefill_tps", "ttft_s", "rtf", "peak_memory_gb")  # the last is checked, not fitted


@dataclass(frozen=True)
class Engine:
    """What an engine reads per decoded token beyond the weights, and holds beside the model."""

    name: str
    kv_bytes: int  # bytes a cached key or value takes
    static_cache: bool  # fixed shapes: every token attends over the whole context, not only the tokens so far
    # What the process running it holds beside weights, KV cache and activations: the library, its compute buffers,
    # the program around it (edgeport's Python runtime). Measured for the CPU engines by bench/fit.py (peak RSS of
    # `edgeport bench` over the plan's own figures, median of the fixture's variants: bench/fit.json of 2026-12-05
    # gives MLX 169 MB, onnxruntime 228, llama.cpp 306); 0 where not yet measured.
    runtime_bytes: int = 0
    float_dtype: str | None = None  # what it widens float weights to, where it does not keep the artifact's

    def holding(self, quant: quantization.Quantization) -> quantization.Quantization:
        """`quant` as this engine holds the weights in memory."""
        return replace(quant, dtype=self.float_dtype) if self.float_dtype and quant.is_float else quant


ENGINES: dict[tuple[str, str], Engine] = {
    ("mlx", "gpu"): Engine("MLX on the GPU", 2, False),
    # MLX's CPU build has no fast 16-bit arithmetic: edgeport runs it in float32 (engines.mlx), float weights too
    ("mlx", "cpu"): Engine("MLX on the CPU", 4, False, runtime_bytes=170_000_000, float_dtype="float32"),
    ("coreml", "gpu"): Engine("Core ML on the GPU", 2, True),
    ("coreml", "npu"): Engine("Core ML on the Neural Engine", 2, True),
    ("onnx", "npu"): Engine("QNN on the Hexagon NPU", 2, True),  # 16-bit activations, so a 16-bit cache
    # the CPU graph's inputs and outputs are float32
    ("onnx", "cpu"): Engine("onnxruntime on the CPU", 4, False, runtime_bytes=240_000_000),
    ("gguf", "cpu"): Engine("llama.cpp on the CPU", 2, False, runtime_bytes=310_000_000),  # a float16 KV cache
    ("gguf", "gpu"): Engine("llama.cpp on the GPU (Metal, CUDA)", 2, False),
    ("ct2", "cpu"): Engine("CTranslate2 on the CPU", 4, False),  # int8 weights, float32 compute
}


@dataclass(frozen=True)
class Origin:
    """Where one kind of share (decode, prefill, speech) came from: its rows, and whose they were."""

    rows: int
    sources: tuple[str, ...] = ()
    device: str | None = None  # fitted on this device's own rows, not on every device's
    backend: str | None = None  # fitted on the rows of devices with this backend (Metal, CUDA, arm64...) only
    lenders: tuple[str, ...] = ()  # borrowed: the other engines on the unit whose rows gave it

    def says(self, counts: str) -> str:
        if self.lenders:
            return (
                f"{counts} borrowed from the other engines on its unit ({', '.join(self.lenders)}), having no such "
                "measurement of its own: a guess until one is measured"
            )
        whose = f"{self.device}'s own " if self.device else f"{self.backend} devices' " if self.backend else ""
        plural = "" if counts.startswith("1 ") and " and " not in counts else "s"
        return f"fitted on {whose}{counts} measurement{plural} ({'; '.join(self.sources)})"


@dataclass(frozen=True)
class Efficiency:
    """The share of each roofline an engine reaches, and for each kind the measurements that say so (a kind
    without an origin: its roofline)."""

    decode: float = 1.0
    token_s: float = 0.0
    prefill: float = 1.0
    speech: float = 1.0  # transcription: the share of Whisper's RTF roofline reached (families.whisper.speeds)
    origins: dict[str, Origin] = field(default_factory=dict)  # by kind: decode, prefill, speech

    def decode_tps(self, roofline_tps: float) -> float:
        return 1 / (1 / (roofline_tps * self.decode) + self.token_s)

    def prefill_tps(self, roofline_tps: float) -> float:
        return roofline_tps * self.prefill

    def rows(self, kind: str) -> int:
        """How many of the engine's own measurements gave this kind's share (0: borrowed, or the roofline)."""
        origin = self.origins.get(kind)
        return 0 if origin is None or origin.lenders else origin.rows

    @property
    def borrowed(self) -> tuple[str, ...]:
        return tuple(kind for kind, origin in self.origins.items() if origin.lenders)

    @property
    def device(self) -> str | None:
        return next((o.device for o in self.origins.values() if o.device), None)

    def over(self, general: "Efficiency") -> "Efficiency":
        """This efficiency, with each kind it has no origin for taken from `general`."""
        taken = [kind for kind in general.origins if kind not in self.origins]
        named = {"decode": ("decode", "token_s"), "prefill": ("prefill",), "speech": ("speech",)}
        values = {name: getattr(general, name) for kind in taken for name in named[kind]}
        return replace(self, **values, origins={**self.origins, **{kind: general.origins[kind] for kind in taken}})

    def describe(self, engine: Engine) -> str:
        if not self.origins:
            return f"{engine.name}: no measurement yet, so the rooflines themselves"
        shares = []
        if "decode" in self.origins or "prefill" in self.origins:
            fixed = f" + {self.token_s * 1e3:.1f} ms a token" if self.token_s else ""
            shares.append(
                f"decode at {self.decode:.0%} of the bandwidth roofline{fixed}, prefill at {self.prefill:.0%} of "
                "the compute roofline"
            )
        if "speech" in self.origins:
            shares.append(f"transcription at {self.speech:.0%} of the RTF roofline")
        if "decode" in self.origins and "prefill" not in self.origins:
            shares.append("no prefill measurement: its roofline")
        names = {"decode": "decode", "prefill": "prefill", "speech": "transcription"}
        groups: dict[tuple, list[tuple[str, Origin]]] = {}  # kinds of one origin: same device, backend, lenders
        for kind, origin in self.origins.items():
            groups.setdefault((origin.device, origin.backend, origin.lenders), []).append((names[kind], origin))
        origins = []
        for given in groups.values():
            first = given[0][1]
            sources = tuple(dict.fromkeys(source for _, origin in given for source in origin.sources))
            counts = " and ".join(name if first.lenders else f"{origin.rows} {name}" for name, origin in given)
            origins.append(replace(first, sources=sources).says(counts))
        return f"{engine.name}: {'; '.join(shares)}; {'; '.join(origins)}"


@dataclass(frozen=True)
class Measurement:
    device: str
    model: str
    format: str
    unit: str
    quantization: str
    context: int
    prompt_tokens: int
    metric: str  # decode_tps | prefill_tps | ttft_s | peak_memory_gb
    value: float
    source: str

    @property
    def engine(self) -> tuple[str, str]:
        return (self.format, self.unit)

    @property
    def kind(self) -> str:
        return {"decode_tps": "decode", "peak_memory_gb": "memory", "rtf": "speech"}.get(self.metric, "prefill")

    @property
    def observed(self) -> float:
        """The measurement as the plan gives it: tokens a second (a TTFT is a prefill rate over its prompt), or GB."""
        return self.prompt_tokens / self.value if self.metric == "ttft_s" else self.value


@dataclass(frozen=True)
class Device:
    bandwidth_gbs: float
    tflops: dict[str, float]
    backends: dict[str, str] = field(default_factory=dict)  # per unit: what runs the kernels there (Target.backend)


@dataclass(frozen=True)
class Data:
    measurements: tuple[Measurement, ...]
    devices: dict[str, Device]
    configs: dict[str, dict]

    def roofline(self, m: Measurement) -> float:
        """The roofline of `m`'s metric in tok/s, by the plan's own formulas; for a transcription row the RTF at
        the rooflines; for a peak memory row, the plan's peak in GB (which no efficiency scales)."""
        from edgeport.families.causal_lm import decode_roofline_tps, memory, model_size, prefill_roofline_tps

        if m.kind == "speech":
            return self.planned_rtf(m, Efficiency())
        device, engine = self.devices[m.device], ENGINES[m.engine]
        quant = quantization.get(m.quantization, m.format)
        size = model_size(self.configs[m.model])
        if m.kind == "memory":
            return memory(size, quant, engine, m.context)[2] / 1e9
        if m.kind == "decode":
            cached = m.context if engine.static_cache else m.prompt_tokens
            return decode_roofline_tps(size, quant, engine, cached, device.bandwidth_gbs)
        return prefill_roofline_tps(size, device.tflops[m.unit])

    def planned_rtf(self, m: Measurement, efficiency: Efficiency) -> float:
        """What the plan expects for a transcription row at `efficiency` (at the default one: the RTF roofline)."""
        from edgeport.families.whisper import real_time_factor, rooflines, speeds, whisper_size

        device, quant = self.devices[m.device], quantization.get(m.quantization, m.format)
        size = whisper_size(self.configs[m.model])
        encode_s, decode_tps = rooflines(size, quant, ENGINES[m.engine], device.bandwidth_gbs, device.tflops[m.unit])
        return real_time_factor(*speeds(encode_s, decode_tps, efficiency))

    def expected(self, m: Measurement, efficiency: Efficiency) -> float:
        """What the plan expects for `m` at `efficiency`, in the row's unit."""
        if m.kind == "speech":
            return self.planned_rtf(m, efficiency)
        roofline = self.roofline(m)
        return {"decode": efficiency.decode_tps, "prefill": efficiency.prefill_tps}.get(m.kind, float)(roofline)


@cache
def data() -> Data:
    """The bundled measurements, checked: every device, model, engine and quantization named is known."""
    from edgeport import targets

    text = (resources.files("edgeport.data") / "measurements.toml").read_text()
    raw = tomllib.loads(text)
    devices = {
        name: Device(d["bandwidth_gbs"], d["tflops"], d.get("backends", {}))
        for name, d in raw.get("devices", {}).items()
    }
    for name in targets.names():
        if name != "host":
            target = targets.load(name)
            backends = {unit: target.backend(unit) for unit in target.tflops if target.backend(unit)}
            devices[name] = Device(target.bandwidth_gbs, target.tflops, backends)
    configs = {name: m["config"] for name, m in raw["models"].items()}
    rows = []
    for i, row in enumerate(raw["measurements"]):
        where = f"measurements.toml measurement {i + 1}"
        if row["device"] not in devices or row["model"] not in configs:
            raise EdgeportError(f"{where}: unknown device {row['device']} or model {row['model']}")
        if (row["format"], row["unit"]) not in ENGINES:
            raise EdgeportError(f"{where}: no engine runs {row['format']} on the {row['unit']}")
        fields = {k: row[k] for k in ("device", "model", "format", "unit", "quantization", "context")}
        for metric in METRICS:
            if metric in row:
                rows.append(
                    Measurement(
                        **fields,
                        prompt_tokens=row["prompt_tokens"],
                        metric=metric,
                        value=float(row[metric]),
                        source=row["source"],
                    )
                )
    return Data(tuple(rows), devices, configs)


def fit(measurements: list[Measurement], data: Data) -> dict[tuple[str, str, str | None], Efficiency]:
    """Each engine's efficiencies from its rows of `measurements`, keyed (format, unit, None); where the engine's
    rows come from several backends and one has DEVICE_ROWS decode rows, that backend's, keyed (format, unit,
    backend): llama.cpp's Metal kernels pay more a token than its CUDA ones; and where a device has as many, that
    device's own, keyed (format, unit, device): a laptop's NPU may draw a smaller share of its memory bus than a
    phone's does. A narrower fit takes each kind it has no rows of from the wider one."""
    fitted = {}
    for fmt, unit in ENGINES:
        rows = [m for m in measurements if m.engine == (fmt, unit)]
        engine = _borrow(_fit_rows(rows, data), (fmt, unit), measurements, data)
        fitted[(fmt, unit, None)] = engine
        backends = {m: data.devices[m.device].backends.get(unit) for m in rows}
        if len(set(backends.values())) > 1:
            for backend in set(backends.values()) - {None}:
                own = [m for m in rows if backends[m] == backend]
                if _decode_rows(own) >= DEVICE_ROWS:
                    fitted[(fmt, unit, backend)] = _fit_rows(own, data, backend=backend).over(engine)
        for device in {m.device for m in rows}:
            own = [m for m in rows if m.device == device]
            if _decode_rows(own) >= DEVICE_ROWS:
                wider = fitted.get((fmt, unit, data.devices[device].backends.get(unit)), engine)
                fitted[(fmt, unit, device)] = _fit_rows(own, data, device=device).over(wider)
    return fitted


def _borrow(own: Efficiency, engine: tuple[str, str], measurements: list[Measurement], data: Data) -> Efficiency:
    """`own` with the decode or prefill shares it has no rows for taken from the other engines on its unit (on the
    backends its own rows ran on, if any): a real engine on the same silicon reaches some share of its rooflines,
    which is nearer the truth than all of them."""
    unit = engine[1]
    backends = {data.devices[m.device].backends.get(unit) for m in measurements if m.engine == engine}
    lent = [
        m
        for m in measurements
        if m.unit == unit
        and m.engine != engine
        and m.kind in ("decode", "prefill")
        and m.kind not in own.origins
        and (not backends or data.devices[m.device].backends.get(unit) in backends)
    ]
    other = _fit_rows(lent, data)
    lenders = {
        kind: tuple(dict.fromkeys(ENGINES[m.engine].name for m in lent if m.kind == kind)) for kind in other.origins
    }
    return own.over(replace(other, origins={k: replace(o, lenders=lenders[k]) for k, o in other.origins.items()}))


def _decode_rows(rows: list[Measurement]) -> int:
    return sum(m.kind == "decode" for m in rows)


def _fit_rows(rows: list[Measurement], data: Data, device: str | None = None, backend: str | None = None) -> Efficiency:
    decode = [(data.roofline(m), m.value) for m in rows if m.kind == "decode"]
    prefill = [m.observed / data.roofline(m) for m in rows if m.kind == "prefill"]
    speech = [data.roofline(m) / m.observed for m in rows if m.kind == "speech"]  # RTFs: lower is faster
    share, token_s = _decode_fit(decode) if decode else (1.0, 0.0)
    origins = {}
    for kind in ("decode", "prefill", "speech"):
        mine = [m for m in rows if m.kind == kind]
        if mine:
            sources = tuple(dict.fromkeys(_publisher(m.source) for m in mine))
            origins[kind] = Origin(len(mine), sources, device, backend)
    return Efficiency(
        decode=share,
        token_s=token_s,
        prefill=_geometric_mean(prefill),
        speech=_geometric_mean(speech),
        origins=origins,
    )


def _geometric_mean(shares: list[float]) -> float:
    return math.exp(sum(map(math.log, shares)) / len(shares)) if shares else 1.0


def _decode_fit(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """(efficiency, fixed seconds a token) minimizing the squared relative error of t = r / efficiency + c over
    (roofline tok/s, measured tok/s) rows: with x = r / t and z = 1 / t, a x + c z should be 1."""
    x = [measured / roofline for roofline, measured in rows]
    z = [measured for _, measured in rows]
    sxx, sxz, szz = sum(a * a for a in x), sum(a * b for a, b in zip(x, z, strict=True)), sum(b * b for b in z)
    sx, sz = sum(x), sum(z)
    det = sxx * szz - sxz * sxz
    if len(rows) >= FIXED_COST_ROWS and det > 0:
        a, c = (sx * szz - sz * sxz) / det, (sxx * sz - sxz * sx) / det
        if a > 0 and c >= 0:
            return 1 / a, c
    return sxx / sx, 0.0


def _publisher(source: str) -> str:
    return source.split(" ")[0]


@cache
def efficiencies() -> dict[tuple[str, str, str | None], Efficiency]:
    d = data()
    return fit(list(d.measurements), d)


def efficiency(
    fmt: str, unit: str, device: str | None = None, backend: str | None = None, fitted: dict | None = None
) -> Efficiency:
    """The device's own efficiencies for the engine where its rows gave them, else its backend's, else the
    engine's."""
    fitted = efficiencies() if fitted is None else fitted
    for scope in (device, backend):
        if scope is not None and (fmt, unit, scope) in fitted:
            return fitted[(fmt, unit, scope)]
    return fitted.get((fmt, unit, None), Efficiency())


@dataclass(frozen=True)
class Check:
    """One measurement beside what the plan's formulas predict for it."""

    measurement: Measurement
    roofline: float  # tok/s (a peak memory row: the plan's GB, which no efficiency scales)
    predicted: float  # the plan's expected figure, in the same unit

    @property
    def error(self) -> float:
        return self.predicted / self.measurement.observed - 1

    @property
    def roofline_error(self) -> float:
        return self.roofline / self.measurement.observed - 1


def check(data: Data, held_out: bool = False) -> list[Check]:
    """Every measurement against the fit: on all rows, or `held_out`, each row against a fit on all the others."""
    everything = list(data.measurements)
    fitted = None if held_out else fit(everything, data)
    checks = []
    for i, m in enumerate(everything):
        efficiencies_here = fit(everything[:i] + everything[i + 1 :], data) if held_out else fitted
        e = efficiency(m.format, m.unit, m.device, data.devices[m.device].backends.get(m.unit), efficiencies_here)
        checks.append(Check(m, data.roofline(m), data.expected(m, e)))
    return checks
