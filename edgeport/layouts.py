"""What an artifact folder holds, one dataclass per layout: the converter writes it (as the JSON file beside the
model, where the layout needs more than the model files say) and the runner reads it back. Which engine runs a
layout, and whether it is the shape an NPU compiles, is said here once."""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from edgeport.errors import EdgeportError
from edgeport.files import read_json

# Tokens per prefill call of the static shapes: what a Qualcomm NPU compiles well, and what the Neural Engine does.
QNN_PREFILL_CHUNK = 128
ANE_PREFILL_CHUNK = 64
MASK_VALUE = -100.0  # additive mask of the QNN graphs: vanishes in softmax, kind to 16-bit activation scales


@dataclass(frozen=True)
class Layout:
    family: ClassVar[str]
    format: ClassVar[str]
    engine: ClassVar[str]  # the module of edgeport.engines that runs it
    marker: ClassVar[str]  # the file that tells this layout in a folder
    described: ClassVar[bool] = False  # the marker is edgeport's description of the layout: the fields below
    unit: ClassVar[str] = "cpu"  # what the layout is shaped for, where its fields do not say

    @property
    def shape(self) -> str:
        """What the layout is shaped for: "npu" for the static graphs an NPU compiles, else "gpu" or "cpu"."""
        return self.unit

    @property
    def for_qnn(self) -> bool:
        """The QDQ graphs Qualcomm's QNN runs (on onnxruntime's QNN EP, or compiled by AI Hub)."""
        return False

    def write(self, folder: Path) -> None:
        if self.described:
            (folder / self.marker).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, folder: Path) -> "Layout":
        if not cls.described:
            return cls()
        file = folder / cls.marker
        data = read_json(file, "convert again")
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except TypeError as e:
            raise EdgeportError(f"{file}: not the {cls.format} layout this edgeport writes ({e}); convert again") from e


@dataclass(frozen=True)
class MLXModel(Layout):
    """A folder `mlx_lm.load` reads."""

    family, format, engine, marker, unit = "causal-lm", "mlx", "mlx", "config.json", "gpu"


@dataclass(frozen=True)
class MLXWhisper(Layout):
    """A folder mlx-whisper's `load_model` reads: its ModelDimensions as config.json, weights in its names (OpenAI's;
    `weight_name` maps transformers' onto them; mlx-whisper ships no converter)."""

    family, format, engine, marker, unit = "whisper", "mlx", "mlx", "weights.safetensors", "gpu"
    # transformers name fragment -> mlx-whisper's name fragment, applied in order
    RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.", ""),
        ("encoder.layer_norm.", "encoder.ln_post."),
        ("decoder.layer_norm.", "decoder.ln."),
        ("embed_tokens.weight", "token_embedding.weight"),
        ("decoder.embed_positions.weight", "decoder.positional_embedding"),
        (".layers.", ".blocks."),
        ("self_attn_layer_norm", "attn_ln"),
        ("encoder_attn_layer_norm", "cross_attn_ln"),
        ("final_layer_norm", "mlp_ln"),
        ("self_attn.", "attn."),
        ("encoder_attn.", "cross_attn."),
        ("q_proj", "query"),
        ("k_proj", "key"),
        ("v_proj", "value"),
        ("out_proj", "out"),
        ("fc1", "mlp1"),
        ("fc2", "mlp2"),
    )
    # Not stored by mlx-whisper: the output projection is the token embedding, the encoder's positions are computed.
    OUTPUT_PROJECTION, ENCODER_POSITIONS = "proj_out.weight", "model.encoder.embed_positions.weight"

    @staticmethod
    def weight_name(name: str) -> str:
        """mlx-whisper's name for the transformers weight `name`."""
        for old, new in MLXWhisper.RENAMES:
            name = name.replace(old, new)
        return name


@dataclass(frozen=True)
class OnnxCPU(Layout):
    """onnxruntime-genai's folder: a dynamic-shape graph with its KV cache and genai_config.json."""

    family, format, engine, marker = "causal-lm", "onnx", "onnx", "genai_config.json"


@dataclass(frozen=True)
class OnnxPart:
    """One part of the NPU shape: decoder layers [first_layer, end_layer) as a `prefill` graph over the prefill
    chunk and a `decode` graph over one token. The first part takes `input_ids` (it holds the embedding), the others
    the previous part's `output_hidden_states` as `hidden_states`; the last returns `logits`. Each reads and
    returns the KV cache of its own layers. The two graphs keep their weights in one external data file,
    `weights`, each tensor once."""

    prefill: str
    decode: str
    first_layer: int
    end_layer: int
    weights: str = ""  # empty in outputs from before the graphs shared their weights

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def graph(self, width: int) -> str:
        return self.decode if width == 1 else self.prefill


@dataclass(frozen=True)
class OnnxNPU(Layout):
    """`parts`, run in order, each a graph over `prefill_chunk` tokens and one over a single token, all reading a
    fixed-length KV cache the app keeps; QDQ-quantized for QNN."""

    family, format, engine, marker, described, unit = "causal-lm", "onnx", "onnx", "npu.json", True, "npu"
    prefill_chunk: int
    context_length: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    mask_value: float
    inputs: list
    outputs: list
    cache: str
    parts: list  # of OnnxPart, in the order they run
    weights: str | None = None  # set once quantized
    activations: str | None = None
    opset: int | None = None

    def __post_init__(self):
        parts = [p if isinstance(p, OnnxPart) else OnnxPart(**p) for p in self.parts]
        for part in parts:  # names a runner joins to the folder: nothing that leads out of it
            for file in (part.prefill, part.decode):
                if Path(file).name != file or not file.endswith(".onnx"):
                    raise TypeError(f"graph {file!r} is not a .onnx file in the folder")
        object.__setattr__(self, "parts", parts)

    @property
    def for_qnn(self) -> bool:
        return True


@dataclass(frozen=True)
class OnnxWhisper(Layout):
    """`encoder.onnx` once per 30 s window, `decoder.onnx` per step over a KV cache the app keeps: any number of
    tokens over a growing cache (CPU shape) or one token over a fixed one (`static`, the NPU shape)."""

    family, format, engine, marker, described = "whisper", "onnx", "onnx", "whisper.json", True
    static: bool
    decoder_cache: int | None
    layers: int
    heads: int
    head_dim: int
    frames: int
    mask_value: float
    encoder: dict
    decoder: dict
    cache: str
    weights: str | None = None  # the quantization, set once quantized

    @property
    def shape(self) -> str:
        return "npu" if self.static else "cpu"

    @property
    def for_qnn(self) -> bool:
        return self.static


@dataclass(frozen=True)
class CoreMLChunk:
    """One package of a chunked model: decoder layers [first_layer, end_layer). The first chunk takes `input_ids`
    (it holds the embedding), the others the previous chunk's `hidden_states`; the last one returns `logits`, the
    others `output_hidden_states` (fp16, [1, tokens, hidden]). Each holds the KV cache of its own layers."""

    package: str
    first_layer: int
    end_layer: int

    @property
    def layers(self) -> int:
        return self.end_layer - self.first_layer


@dataclass(frozen=True)
class CoreMLModel(Layout):
    """`chunks`, run in order: .mlpackages of consecutive layers, each with one flexible function (GPU), or
    `prefill` and `decode` functions over the same weights (Neural Engine, `prefill_chunk` set); each chunk's KV
    cache is Core ML state or passed in and out. Every chunk takes the same `causal_mask` and `position`."""

    family, format, engine, marker, described = "causal-lm", "coreml", "coreml", "coreml.json", True
    compute_units: str
    prefill_chunk: int | None
    context_length: int
    kv_cache: str  # "state" | "inputs and outputs"
    cache_shape: list  # the whole model's: layers, batch, KV heads, context, head dim
    chunks: list  # of CoreMLChunk, in the order they run

    def __post_init__(self):
        chunks = [c if isinstance(c, CoreMLChunk) else CoreMLChunk(**c) for c in self.chunks]
        for chunk in chunks:  # names a runner joins to the folder: nothing that leads out of it
            if Path(chunk.package).name != chunk.package or not chunk.package.endswith(".mlpackage"):
                raise TypeError(f"chunk package {chunk.package!r} is not a .mlpackage in the folder")
        object.__setattr__(self, "chunks", chunks)

    @property
    def shape(self) -> str:
        return "npu" if self.prefill_chunk else "gpu"

    def chunk_cache_shape(self, chunk: CoreMLChunk) -> list:
        return [chunk.layers, *self.cache_shape[1:]]


@dataclass(frozen=True)
class CoreMLWhisper(Layout):
    """`encoder.mlpackage` (features -> cross-attention keys and values) and `decoder.mlpackage` (one token)."""

    family, format, engine, marker, described = "whisper", "coreml", "coreml", "coreml.json", True
    compute_units: str
    deployment_target: str
    kv_cache: str
    cache_shape: list
    cross_shape: list
    mask: str

    @property
    def shape(self) -> str:
        return "npu" if self.compute_units == "CPU_AND_NE" else "gpu"


@dataclass(frozen=True)
class GGUFModel(Layout):
    """`model.gguf`, as llama.cpp loads it, for the compute unit the plan chose: "gpu" (Metal, CUDA) or "cpu"."""

    family, format, engine, marker, described = "causal-lm", "gguf", "gguf", "gguf.json", True
    compute_unit: str
    file_type: str  # llama.cpp's name for the file's quantization (MOSTLY_Q4_K_M, …)
    backend: str = ""  # what llama.cpp runs it with on the device: Metal, CUDA, or the CPU's arm64 / x86_64 kernels

    @property
    def shape(self) -> str:
        return self.compute_unit


@dataclass(frozen=True)
class CT2Whisper(Layout):
    """A CTranslate2 folder, as faster-whisper loads it."""

    family, format, engine, marker = "whisper", "ct2", "ct2", "model.bin"


# (family, format) -> the layouts its converter writes, the more specific first
LAYOUTS: dict[tuple[str, str], tuple[type[Layout], ...]] = {}
for _layout in (
    MLXModel,
    MLXWhisper,
    OnnxNPU,
    OnnxCPU,
    OnnxWhisper,
    CoreMLModel,
    CoreMLWhisper,
    GGUFModel,
    CT2Whisper,
):
    LAYOUTS.setdefault((_layout.family, _layout.format), ())
    LAYOUTS[_layout.family, _layout.format] += (_layout,)


def builds_qnn_shape(fmt: str, quant) -> bool:
    """Whether a step at `quant` builds the QDQ graphs QNN runs (OnnxNPU, static OnnxWhisper): ONNX with
    quantized activations. A dynamic CPU shape otherwise."""
    return fmt == "onnx" and bool(quant.activation_bits)


def read(family: str, fmt: str, folder: Path) -> Layout:
    """The layout of the artifact in `folder`, as its converter wrote it."""
    for layout in LAYOUTS.get((family, fmt), ()):
        if (folder / layout.marker).is_file():
            return layout.read(folder)
    raise EdgeportError(f"{folder}: not a {family} {fmt} artifact this edgeport wrote; convert again")
