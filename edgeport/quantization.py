"""Every quantization edgeport knows, for which formats, and what it costs in bits per weight."""

import re
from dataclasses import dataclass, replace

from edgeport.errors import EdgeportError


@dataclass(frozen=True)
class Quantization:
    name: str
    formats: tuple[str, ...]
    bits: int | None  # weight bits; None keeps weights in `dtype`
    group_size: int | None = None  # weights sharing one scale; None: one scale per output channel
    dtype: str = "float16"  # the float type of everything not quantized
    recipe: str | None = None  # an mlx-lm mixed-precision recipe: `bits` for most weights, `high_bits` for some
    high_bits: int | None = None
    scale_bits: int = 16  # bits of scale (and bias, for MLX affine) stored per group
    judged_as: str | None = None  # the parity bounds that apply, when not this quantization's own
    activation_bits: int | None = None  # set for static (QDQ) quantization of activations too, as NPUs run
    head_bits: int | None = None  # the output projection's bits, where it keeps more than the rest (per channel)
    embedding_bits: int | None = None  # the input embedding's bits, where it is stored apart from the rest

    @property
    def bounds_key(self) -> str:
        return self.judged_as or self.name

    @property
    def is_float(self) -> bool:
        return self.bits is None

    def bits_per_weight(self, high_share: float = 0.0) -> float:
        """Average stored bits per matrix weight; `high_share` is the share a mixed recipe keeps at high_bits."""
        if self.bits is None:
            return 16.0 if self.dtype in ("float16", "bfloat16") else 32.0
        bits = self.bits + (self.high_bits - self.bits) * high_share if self.high_bits else self.bits
        return bits + (self.scale_bits / self.group_size if self.group_size else 0.0)


def _mlx(bits: int) -> Quantization:
    # mlx-lm affine quantization: a float16 scale and bias per group of 64
    return Quantization(f"q{bits}", ("mlx",), bits, group_size=64, scale_bits=32)


def _mixed(low: int, high: int) -> Quantization:
    name = f"mixed_{low}_{high}"
    return Quantization(name, ("mlx",), low, group_size=64, recipe=name, high_bits=high, scale_bits=32)


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("fp16", ("mlx", "coreml", "onnx", "ct2", "gguf"), None),
        Quantization("bf16", ("mlx",), None, dtype="bfloat16"),
        # ONNX's float CPU shape: onnxruntime's CPU kernels mostly lack fp16 (onnxruntime-genai issue 2009)
        Quantization("fp32", ("onnx",), None, dtype="float32"),
        *(_mlx(bits) for bits in (8, 6, 5, 4, 3, 2)),
        *(_mixed(low, high) for low, high in ((4, 6), (3, 6), (3, 4), (2, 6))),
        Quantization("int8-channel", ("coreml",), 8),
        Quantization("int4-block32", ("coreml", "onnx"), 4, group_size=32),
        # onnxruntime's CPU kernels run larger blocks faster (bench/onnx_cpu.json); one scale per 64 or 128 weights
        Quantization("int4-block64", ("onnx",), 4, group_size=64, judged_as="int4-block32"),
        Quantization("int4-block128", ("onnx",), 4, group_size=128, judged_as="int4-block32"),
        Quantization("palettize4", ("coreml",), 4),  # 16-entry lookup table per tensor: negligible overhead
        Quantization("int8", ("onnx", "ct2"), 8),  # per-channel weights, activations quantized at run time (CPU)
        # Per-channel weights, 16-bit activations. The embedding table is a Gather's data, which the QNN recipe
        # quantizes as an activation: 16 bits.
        Quantization("w8a16", ("onnx",), 8, activation_bits=16, embedding_bits=16),
        # int4 blocks of 32; the output projection keeps 8-bit weights (convert.onnx, as AI Hub's exports do)
        Quantization("w4a16", ("onnx",), 4, group_size=32, activation_bits=16, head_bits=8, embedding_bits=16),
        # llama.cpp's own types (its quantizer's names): blocks of 32 with a float16 scale (Q8_0, Q4_0), or K-quants'
        # super-blocks of 256 whose 6-bit sub-block scales cost about as much. _M mixes: the output projection and,
        # in the first and last eighth of the layers and every third between, v_proj and down_proj at Q6_K.
        Quantization("Q8_0", ("gguf",), 8, group_size=32, judged_as="q8"),
        Quantization("Q5_K_M", ("gguf",), 5, group_size=32, recipe="Q5_K_M", high_bits=6, head_bits=6, judged_as="q5"),
        Quantization(
            "Q4_K_M", ("gguf",), 4, group_size=32, recipe="Q4_K_M", high_bits=6, head_bits=6, judged_as="mixed_4_6"
        ),
        Quantization("Q4_0", ("gguf",), 4, group_size=32, head_bits=6, judged_as="q4"),
    )
}

# For "the largest quantization that fits": each format's choices from most to fewest bits.
LADDERS: dict[str, tuple[str, ...]] = {
    "mlx": ("fp16", "q8", "q6", "q5", "q4", "q3", "q2"),
    "coreml": ("fp16", "int8-channel", "int4-block32"),
    "onnx": ("fp16", "w8a16", "w4a16"),
    "ct2": ("fp16", "int8"),
    "gguf": ("fp16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"),
}


def lookup(name: str) -> Quantization | None:
    """A quantization by name; MLX affine ones also come with another group size, e.g. q4-g32 or q8-g128."""
    if name in QUANTIZATIONS:
        return QUANTIZATIONS[name]
    grouped = re.fullmatch(r"(q[234568])-g(32|64|128)", name)
    if grouped:
        return replace(QUANTIZATIONS[grouped[1]], name=name, group_size=int(grouped[2]), judged_as=grouped[1])
    return None


def get(name: str, fmt: str) -> Quantization:
    quant = lookup(name)
    if quant is None or fmt not in quant.formats:
        valid = ", ".join(q.name for q in QUANTIZATIONS.values() if fmt in q.formats)
        extra = " (MLX: also q4-g32, q8-g128, … for another group size)" if fmt == "mlx" else ""
        raise EdgeportError(f"quantization '{name}' is not available for {fmt}; choose one of: {valid}{extra}")
    return quant
