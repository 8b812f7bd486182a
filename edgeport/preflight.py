"""Before any weight is read or downloaded: what each step of a conversion will cost on this machine (peak memory,
wall time, disk), from the config alone, and which steps the machine has room for.

A step's peak resident memory is a fixed part (the interpreter and the libraries it imports) plus bytes per unit of
the model that the step holds at once: per parameter, per byte of the source's weights, per byte of the artifact,
per parameter of the largest block the paged reference reads at a time. The rates are fitted to what `edgeport
convert` measured on a 135M (SmolLM2) and a 1.24B (Llama-3.2-1B shape) model on a 2-core x86 Linux box
(`make bench-scale` writes the figures to bench/scale.json with the prediction beside each). Wall times scale with
the machine; they feed the progress bar's ETA and are estimates, not promises.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgeport import quantization
from edgeport.errors import EdgeportError
from edgeport.layouts import builds_qnn_shape
from edgeport.plan import GB, Plan, Step
from edgeport.targets import Target

REFERENCE_TOKENS = 320  # parity tokens at --parity full (three chat prompts and the paragraph), a little over
FAST_TOKENS = 110


@dataclass(frozen=True)
class Rate:
    """Peak memory and wall time of one kind of step, as a fixed part plus parts per unit of the model."""

    base_gb: float
    per_param: float = 0.0  # bytes per parameter of the model
    per_source_byte: float = 0.0
    per_artifact_byte: float = 0.0
    per_block_param: float = 0.0  # bytes per parameter of the largest block of weights
    per_paged_param: float = 0.0  # bytes per parameter of the largest block the paged reference holds
    per_part_param: float = 0.0  # bytes per parameter of the largest part a converter builds at a time
    per_unit_param: float = 0.0  # bytes per parameter of the largest unit the NPU shape is exported in
    per_npu_part_param: float = 0.0  # bytes per parameter of the NPU shape's largest part as built
    per_unit_cache_byte: float = 0.0  # per byte of that unit's share of the float32 KV cache
    per_cache_byte: float = 0.0  # per byte of a float32 KV cache over the target's context
    seconds: float = 0.0  # fixed
    seconds_per_gparam: float = 0.0  # per billion parameters
    temporary_per_param: float = 0.0  # bytes written to the temporary folder and removed after
    temporary_per_part_param: float = 0.0  # the same, per parameter of the largest part (written a part at a time)
    temporary_per_unit_param: float = 0.0  # per parameter of the largest unit (written a unit at a time)
    temporary_per_unit_cache_byte: float = 0.0  # and per byte of that unit's share of the float32 KV cache


# Fitted (least relative error) to the 135M fixture and the 1.24B, 3.21B and 8.03B Llama shapes (`bench/scale.json`),
# peak GB: the reference 0.70 / 0.77–0.80 / 1.10 / 1.58, a layer at a time (1.63–1.73 / 2.28–2.37 / 2.81–3.00 while it
# read the vocabulary's tables whole); mlx convert 0.46 / 1.63 / 2.95 / 5.67; quantized MLX parity - / 1.12 / 1.39 (1.06
# / 3.3 / 4.71 / 8.45 while the tables were read whole); the ONNX CPU convert 0.69 / 2.34 / 3.89 / 10.07 (the builder's
# int4 pass a weight at a time, a MatMul's a slice of columns at a time: the quantized weights it holds until the graph
# is saved make the peak, with the float32 table saved last; 0.96 / 4.65 / 7.96 / 11.1 while the output projection was
# quantized whole, four float32 copies of it); ONNX CPU parity - / 2.02 / 3.82 / 7.55 (1.00 / 3.84 / 7.47 / 14.75 while
# onnxruntime-genai's copy of the weights was loaded beside the graph's). Core ML converts a chunk of at most
# PART_PARAMS at a time: 2.53–2.60 / 3.34 / 6.52 GB for the GPU's packages (largest chunks of 384M, 495M and 743M
# parameters), 3.01 GB for the 1.24B's Neural Engine packages (two functions each); its parity off a Mac loads one
# package's program at a time to decompress its weights, then runs paged like the reference (1.63 GB for the 1.24B's
# Neural Engine packages). The NPU shape builds a unit at a time.
# Whisper's rest on tiny.en (38M parameters, real weights) and the large-v3-turbo shape (809M, random weights, which
# decode every window to the 448-token limit, so its times are upper bounds): peak GB tiny / turbo, the reference 0.62 /
# 1.40 (the decoder held, the encoder paged); ct2 convert 0.66 / 3.19, parity 0.45 / 1.88; ONNX int8 convert 0.85 /
# 2.05, a unit at a time (1.23 / 3.94 while the float model was read and exported whole; 6.56 while the quantized
# encoder was serialized into its graph, 9.16 while onnxruntime's quantize_dynamic read the float weights three times),
# parity 0.54 / 1.80 (0.64 / 2.06 while the encoder's arena kept a window's activations); Core ML convert 0.67 / 2.04
# (fp16; int8 2.54; 2.81 / 3.32 while the trace's freed activations stayed in glibc's heap; 4.82 / 6.98 while each
# package's description loaded its weights, 7.97 with float32 matrices), parity (paged like the reference) - /
# 1.67–2.95; MLX convert 0.37 / 0.49 (q8: 0.57), parity (the artifact's weights in transformers) - / 1.49 (0.90 / 3.12
# while the artifact's arrays were held); the Snapdragon graphs 0.81 / 2.06, a unit at a time (1.21 / 6.39 while torch
# exported the float encoder whole), their parity 0.62 / 2.39 (0.77 / 2.96 with the encoder's arena).
REFERENCE = {
    "causal-lm": Rate(0.55, per_paged_param=3.6, seconds=4, seconds_per_gparam=20),
    "whisper": Rate(0.47, per_paged_param=4.9, seconds=20, seconds_per_gparam=230),  # transcribes the parity clips
}
REFERENCE_WHOLE = Rate(0.69, per_param=4, seconds=4, seconds_per_gparam=20)  # a checkpoint that cannot be paged
CONVERT = {
    ("causal-lm", "mlx"): Rate(0.38, per_source_byte=0.38, seconds=2, seconds_per_gparam=10),
    ("causal-lm", "onnx", "cpu"): Rate(0.55, per_param=0.98, per_block_param=1.4, seconds=6, seconds_per_gparam=45),
    # The NPU shape builds a unit at a time (UNIT_PARAMS of layers, a larger layer alone, the vocabulary's tables in
    # slices of rows): torch exporting its float32 graphs, and onnxruntime running, calibrating and quantizing them,
    # each hold three to four copies of it. Llama-3.2-1B's largest unit (two layers, 122M parameters): 2.97 GB, 567 s
    # (4.80 GB while its 263M-parameter output projection was one unit; the 8B's 9.92 then, not rerun since).
    ("causal-lm", "onnx", "npu"): Rate(
        2.0,
        per_unit_param=11.4,
        per_unit_cache_byte=2,  # a calibration call's inputs, each a whole static cache of the unit's layers
        seconds=60,
        seconds_per_gparam=380,
        temporary_per_unit_param=16,  # a unit's float prefill and decode graphs, and their prepared copies
        temporary_per_unit_cache_byte=20,  # its calibration calls' inputs, each a whole static cache of its layers
    ),
    # The 16-bit file written a tensor at a time, then llama.cpp's quantizer, which holds a float32 copy of the tensor
    # it quantizes: the largest (the embedding) makes the peak. Q4_K_M of the 1.24B / 3.21B / 8.03B shapes: 2.13 /
    # 3.03 / 3.92 GB, 58 / 133 / 308 s.
    ("causal-lm", "gguf"): Rate(0.35, per_block_param=6.8, seconds=10, seconds_per_gparam=37, temporary_per_param=2),
    ("causal-lm", "coreml", "gpu"): Rate(0.5, per_part_param=6.4, seconds=20, seconds_per_gparam=125),
    # the Neural Engine's packages: two functions (prefill, decode) converted per chunk, then merged (Llama-3.2-1B:
    # 3.01 GB; 4.18 while each package's description loaded its weights, 9.12 while coremltools' weight sharing
    # compared float64 copies)
    ("causal-lm", "coreml", "npu"): Rate(
        0.57, per_part_param=6.4, seconds=40, seconds_per_gparam=300, temporary_per_part_param=1.5
    ),
    # an array at a time read, quantized, written and freed: tiny.en / turbo fp16 0.37 / 0.49 GB, q8 0.39 / 0.57 (fp16
    # 0.40 / 1.96 while MLX's writer computed every array first; q8 turbo 2.81 while the loaded float16 weights were
    # all held beside the quantized ones, 1.24 while the quantized ones were)
    ("whisper", "mlx"): Rate(0.36, per_param=0.16, seconds=1, seconds_per_gparam=5),
    ("whisper", "mlx", "quantized"): Rate(0.38, per_param=0.23, seconds=2, seconds_per_gparam=15),
    # a unit at a time (WhisperDims.unit_params): torch exporting the largest, turbo's decoder layers, makes the peak
    ("whisper", "onnx"): Rate(0.57, per_unit_param=14.1, seconds=9, seconds_per_gparam=128, temporary_per_param=4),
    ("whisper", "onnx", "npu"): Rate(
        0.52, per_unit_param=14.8, seconds=8, seconds_per_gparam=298, temporary_per_param=4
    ),
    # the source's float16 weights mapped, traced with the trace's activations handed back as freed (0.8 GB more for
    # turbo's encoder while glibc's heap kept them), then read into the program: tiny.en / turbo fp16 0.67 / 2.03 GB,
    # int8 0.68 / 2.03 (2.40–2.54 while the compression pass added the int8 weights beside every mapped float16 page
    # the trace had read; each is handed back once its weight is compressed)
    ("whisper", "coreml"): Rate(0.6, per_param=1.77, seconds=12, seconds_per_gparam=70, temporary_per_param=2),
    ("whisper", "ct2"): Rate(0.54, per_param=3.3, seconds=4, seconds_per_gparam=15),
}
PARITY = {
    # off a Mac, the artifact's weights dequantized and run in transformers: 39 s / 171–228 / 436 / 796 s for the
    # four sizes (it was predicted at a quarter of that)
    # a layer dequantized at a time, each weight loaded from the artifact when read, the vocabulary's tables a slice
    # at a time: Llama-3.2-1B / 3B 1.12 / 1.39 GB (1.82 while the artifact's arrays were held, 2.65–2.76 while the
    # tables were read whole)
    ("causal-lm", "mlx", "quantized"): Rate(0.55, per_paged_param=9, seconds=30, seconds_per_gparam=100),
    ("causal-lm", "mlx", "float"): Rate(0.6, per_artifact_byte=1, per_param=4, seconds_per_gparam=400),
    # the metrics computed a few rows at a time since: 1.24B 2.03 GB (2.84 before)
    ("causal-lm", "onnx", "cpu"): Rate(0.3, per_param=0.4, per_block_param=5.7, seconds=2, seconds_per_gparam=10),
    # a part of the NPU shape at a time: Llama-3.2-1B's largest at w4a16 (993M parameters) 2.84 GB (3.92 while
    # onnxruntime's arena kept each call's dequantized weights; Llama-3.1-8B's, 1527M, 5.50 GB then)
    ("causal-lm", "onnx", "npu"): Rate(1.0, per_npu_part_param=1.85, seconds=5, seconds_per_gparam=40),
    # llama.cpp holds the file in memory (not mapped) and every position's logits over its 512-token context:
    # 1.85 GB (1.24B), 15 / 16 / 33 s for the three shapes at Q4_K_M (2.35 / 3.62 / 6.54 GB before the metrics went
    # a few rows at a time).
    ("causal-lm", "gguf"): Rate(1.0, per_artifact_byte=1.02, seconds=10, seconds_per_gparam=3),
    # either shape's packages: each weight read back alone, then run paged like the reference, which makes the peak
    # (0.2–0.4 GB over it): Llama-3.2-1B 1.00 GB for the GPU's and the Neural Engine's alike (1.25 / 1.63 while each
    # package's program was loaded to decompress its weights; 3B 1.53 / 2.04 and 8B 2.09 then)
    ("causal-lm", "coreml"): Rate(0.9, per_paged_param=3.6, seconds=10, seconds_per_gparam=130, temporary_per_param=2),
    # paged like the reference, each weight loaded from the artifact when read: turbo fp16 1.49 GB (3.12 while the
    # artifact's arrays were held)
    ("whisper", "mlx"): Rate(0.47, per_paged_param=5.3, seconds=12, seconds_per_gparam=290),
    # one graph's weights in onnxruntime at a time (the encoder's, then the decoder's, each window), and a window's
    # encoder activations; the QDQ graphs' weights dequantized as each call runs, their 16-bit activations beside the
    # float32 ones (an attention score matrix three times): turbo int8 1.37 GB, w8a16 1.85 (1.81 / 2.39 while both
    # graphs' sessions stayed open)
    ("whisper", "onnx", "cpu"): Rate(0.47, per_artifact_byte=1.11, seconds=2, seconds_per_gparam=27),
    ("whisper", "onnx", "npu"): Rate(0.53, per_artifact_byte=1.63, seconds=1, seconds_per_gparam=87),
    # paged like the reference, the packages' weights read back and decompressed a weight at a time: turbo fp16 / int8
    # 1.46 / 1.49 GB in 61 / 64 s (1.65 / 1.67 while a compressed package's program was loaded to decompress them and
    # the weight file's pages stayed mapped; 2.95 while an fp16 encoder's program was loaded whole)
    ("whisper", "coreml"): Rate(0.63, per_paged_param=4.35, seconds=20, seconds_per_gparam=55, temporary_per_param=2),
    # the weights as the file holds them (CT2Whisper's `packed`): tiny.en / turbo 0.45 / 1.37 GB (1.88 while
    # CTranslate2 packed them, holding both copies while it loaded)
    ("whisper", "ct2"): Rate(0.4, per_param=1.2, seconds=1, seconds_per_gparam=90),
}


@dataclass(frozen=True)
class Estimate:
    """What one step of a conversion is predicted to cost here."""

    step: str  # named as the manifest's steps are
    peak_bytes: int
    seconds: float
    writes_bytes: int  # into the output
    temporary_bytes: int  # into the temporary folder, removed when the step ends
    format: str | None = None  # the plan step it belongs to (None for the reference)
    parity: bool = False


@dataclass(frozen=True)
class Room:
    """What this machine has for the conversion now."""

    memory_bytes: int  # available memory, or --max-memory
    output_disk_bytes: int  # free on the output's file system
    temporary_disk_bytes: int
    cache_disk_bytes: int | None = None  # free where the source's weights will be fetched or converted to, if any
    one_disk: bool = False  # the output and the temporary folder on one file system: what both write shares it

    @classmethod
    def here(cls, out: Path, max_memory_gb: float | None = None, cache: Path | None = None) -> "Room":
        available = psutil.virtual_memory().available
        memory = int(max_memory_gb * GB) if max_memory_gb else available
        temporary = tempfile.gettempdir()
        return cls(
            memory,
            shutil.disk_usage(_existing(out)).free,
            shutil.disk_usage(temporary).free,
            shutil.disk_usage(_existing(cache)).free if cache else None,
            os.stat(_existing(out)).st_dev == os.stat(temporary).st_dev,
        )


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists: the file system it will be on."""
    path = Path(path).expanduser().resolve()
    return next(p for p in [path, *path.parents] if p.exists())


@dataclass(frozen=True)
class Model:
    """What the estimates need of a source, from its config and its files' sizes alone."""

    family: str
    params: int
    source_bytes: int
    block_params: int  # the largest block of weights (a layer, or a vocabulary's table where larger)
    paged_params: int  # the largest block the paged reference holds at once
    vocab: int
    pageable: bool
    cache_bytes: int  # a float32 KV cache over the plan's context
    part_params: int  # the largest part a converter that works part by part (Core ML's chunks) builds at once
    unit_params: int  # the largest unit the NPU shape's converter exports, calibrates and quantizes at once
    npu_part_params: dict[str, int]  # the largest part of the target's NPU shape, by quantization


def model_of(source, context_length: int, target: Target) -> Model:
    family = source.family
    size = family.size(source.config)
    # The weights the converters read: a folder's safetensors (before the source is opened, its files by name); a
    # GGUF or CTranslate2 source is read from its float16 copy in edgeport's cache.
    files = source.origin_files or (sorted(Path(source.path).glob("*.safetensors")) if source.path else [])
    stored = sum(f.stat().st_size for f in files) if source.kind in ("hf-folder", "hf-hub") else 0
    footprint = family.footprint(source.config, context_length, target)
    return Model(
        family=family.name,
        params=size.params,
        source_bytes=stored or 2 * size.params,
        block_params=footprint.block_params,
        paged_params=footprint.paged_params,
        vocab=family.dims(source.config).vocab,
        pageable=footprint.pageable,
        cache_bytes=footprint.cache_bytes,
        part_params=footprint.part_params,
        unit_params=footprint.unit_params,
        npu_part_params=footprint.npu_part_params,
    )


def estimate(model: Model, steps: list[Step], parity: str) -> list[Estimate]:
    """The work `build` will do for `steps`, in its order, each step's cost here."""
    work = []
    if parity != "none":
        tokens = FAST_TOKENS if parity == "fast" else REFERENCE_TOKENS
        logits = tokens * model.vocab * 4 if model.family == "causal-lm" else 0
        rate = REFERENCE[model.family] if model.pageable else REFERENCE_WHOLE
        work.append(_cost("parity reference", rate, model, 0, extra=logits, writes=logits))
    for step in steps:
        name = f"{step.format} {step.quantization}"
        shape = _shape(step)
        convert = CONVERT.get((model.family, step.format, shape)) or CONVERT[model.family, step.format]
        work.append(_cost(f"convert {name}", convert, model, step.weight_bytes, fmt=step.format, writes=None))
        if parity != "none":
            check = PARITY.get((model.family, step.format, shape)) or PARITY[model.family, step.format]
            npu_part = model.npu_part_params.get(step.quantization, model.part_params)
            work.append(
                _cost(f"parity {name}", check, model, step.weight_bytes, step.format, parity=True, npu_part=npu_part)
            )
    return work


def _shape(step: Step) -> str:
    quant = quantization.get(step.quantization, step.format)
    if step.format == "onnx":
        return "npu" if builds_qnn_shape("onnx", quant) else "cpu"
    if step.format == "coreml":
        return step.unit if step.unit in ("gpu", "npu") else "gpu"
    return "float" if quant.is_float else "quantized"


def _cost(
    name, rate: Rate, model: Model, artifact: int, fmt=None, parity=False, extra=0, writes=0, npu_part=0
) -> Estimate:
    peak = (
        rate.base_gb * GB
        + rate.per_param * model.params
        + rate.per_source_byte * model.source_bytes
        + rate.per_artifact_byte * artifact
        + rate.per_block_param * model.block_params
        + rate.per_paged_param * model.paged_params
        + rate.per_part_param * model.part_params
        + rate.per_unit_param * model.unit_params
        + rate.per_npu_part_param * npu_part
        + rate.per_unit_cache_byte * model.cache_bytes * model.unit_params / model.params
        + rate.per_cache_byte * model.cache_bytes
        + extra
    )
    return Estimate(
        step=name,
        peak_bytes=int(peak),
        seconds=round(rate.seconds + rate.seconds_per_gparam * model.params / 1e9, 1),
        writes_bytes=artifact if writes is None else writes,
        temporary_bytes=int(
            rate.temporary_per_param * model.params
            + rate.temporary_per_part_param * model.part_params
            + rate.temporary_per_unit_param * model.unit_params
            + rate.temporary_per_unit_cache_byte * model.cache_bytes * model.unit_params / model.params
        ),
        format=fmt,
        parity=parity,
    )


@dataclass
class Work:
    """The preflight's answer: each step's estimate, and what this machine has no room for."""

    parity: str  # full | fast | none
    estimates: list[Estimate]
    left_out: dict[str, str]  # format -> why it is not built here
    unchecked: dict[str, str]  # format -> why its parity does not run here


def plan_work(source, target: Target, plan: Plan, steps: list[Step], parity: str, room: Room, asked: bool) -> Work:
    """The work of converting `source` into `steps` of `plan` with `parity`, refused with one line where this
    machine has no room for it (see `fitting`)."""
    model = model_of(source, plan.context_length, target)
    room_for_the_source(source, model, room)
    estimates = estimate(model, steps, parity)
    kept, left_out = fitting(estimates, room, asked)
    return Work(parity, estimates, left_out, parity_left_out(kept, room))


def room_for_the_source(source, model: Model, room: Room) -> None:
    """Opening the source whole first writes its weights into a cache where they are not there yet: a hub
    snapshot, or a GGUF's or CTranslate2 model's float16 copy (2 bytes a parameter, either way about)."""
    if source.fills_cache is None or room.cache_disk_bytes is None:
        return
    needs = 2 * model.params
    if needs > room.cache_disk_bytes:
        what, setting = (
            ("downloading it", "HF_HUB_CACHE") if source.kind == "hf-hub" else ("its float16 copy", "EDGEPORT_CACHE")
        )
        raise EdgeportError(
            f"{source.ref}: {what} needs about {_gb(needs)} of disk in {source.fills_cache}, "
            f"{_gb(room.cache_disk_bytes)} are free there: free {_gb(needs - room.cache_disk_bytes)} or set {setting} "
            "to a disk with room"
        )


def fitting(work: list[Estimate], room: Room, asked: bool) -> tuple[list[Estimate], dict[str, str]]:
    """The work this machine has room for, and why each format left out is left out. A conversion that does not fit
    is refused with one line; so is any of it when the user `asked` for the formats by name. A parity run that does
    not fit leaves its artifact built and not checked (the caller records that)."""
    too_big = {e.step: e for e in work if e.peak_bytes > room.memory_bytes}
    left_out = {}
    for e in work:
        if e.step in too_big and not e.parity and e.format:
            left_out[e.format] = f"needs about {_gb(e.peak_bytes)} of memory here for {e.step}, {_room(room)}"
    reference = too_big.get("parity reference")
    if reference:
        raise EdgeportError(
            f"running the source for the parity reference needs about {_gb(reference.peak_bytes)} of memory here, "
            f"{_room(room)}, {_gb(reference.peak_bytes - room.memory_bytes)} short: pass --parity none to skip it"
        )
    kept = [e for e in work if e.format not in left_out]
    others = sorted({e.format for e in kept if e.format})
    if left_out and (asked or not others):
        fmt, why = next(iter(left_out.items()))
        fit = "fits" if len(others) == 1 else "fit"
        instead = f"; {', '.join(others)} {fit} (-f {','.join(others)})" if others else ""
        more = max(e.peak_bytes for e in work if e.format == fmt and not e.parity) - room.memory_bytes
        raise EdgeportError(f"{fmt}: {why}, {_gb(more)} short: convert it on a machine with more memory{instead}")
    writes = sum(e.writes_bytes for e in kept)
    if writes > room.output_disk_bytes:
        raise EdgeportError(
            f"the output needs about {_gb(writes)} of disk, {_gb(room.output_disk_bytes)} are free where it goes: "
            f"free {_gb(writes - room.output_disk_bytes)} or choose another --out"
        )
    temporary = max((e.temporary_bytes for e in kept), default=0)
    if room.one_disk and writes + temporary > room.output_disk_bytes:  # the last step's scratch beside every output
        raise EdgeportError(
            f"the output and a step's temporary files need about {_gb(writes + temporary)} of disk together, "
            f"{_gb(room.output_disk_bytes)} are free on the disk both go to (with {tempfile.gettempdir()}): free "
            f"{_gb(writes + temporary - room.output_disk_bytes)}, or set TMPDIR to another disk or choose another --out"
        )
    if temporary > room.temporary_disk_bytes:
        raise EdgeportError(
            f"a step needs about {_gb(temporary)} of temporary disk, {_gb(room.temporary_disk_bytes)} are free in "
            f"{tempfile.gettempdir()}: free {_gb(temporary - room.temporary_disk_bytes)} or set TMPDIR to a disk "
            "with room"
        )
    return kept, left_out


def parity_left_out(work: list[Estimate], room: Room) -> dict[str, str]:
    """The parity runs (by format) that need more memory than there is: their artifacts are not checked."""
    return {
        e.format: f"its parity run needs about {_gb(e.peak_bytes)} of memory here, {_room(room)}"
        for e in work
        if e.parity and e.peak_bytes > room.memory_bytes
    }


def _room(room: Room) -> str:
    return f"{_gb(room.memory_bytes)} are available"


def _gb(count: float) -> str:
    return f"{count / GB:.1f} GB"
