"""The causal LM family: its dimensions read from config.json, what the plan predicts for it, how parity judges an
artifact of it (logits on chat prompts and perplexity on real text), its bench workload and its table columns.

The plan's formulas for it (the README's "How the plan predicts" spells them out):
- weight bytes  = matrix weights x bits per weight / 8 (the output projection and the embedding at the bits the
                  quantization gives them, where it does: the NPU shape's) + norms in fp16
- KV bytes      = 2 (K and V) x layers x KV heads x head dim x the engine's bytes a value x the context length
- peak memory   = weights + KV cache + one prefill chunk of activations (fp32 logits dominate)
- decode tok/s  = roofline: memory bandwidth / bytes read per token (active weights, and the KV cache of the
                  prompt, or of the whole context for an engine of fixed shapes); expected: the engine's
                  calibrated share of it (edgeport.calibration)
- prefill tok/s = roofline: unit throughput / (2 x active parameters); expected: the engine's calibrated share
- TTFT          = budget prompt length / expected prefill tok/s
Mixture-of-experts models hold every expert in memory but read only the routed ones per token.
"""

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeport import calibration, quantization
from edgeport.calibration import ENGINES, Engine
from edgeport.errors import EdgeportError
from edgeport.parity import Metric, Parity, bounds_for, cosine, judge, kl_divergence, perplexity
from edgeport.plan import GB, NORM_BYTES_PER_VALUE, Footprint, Step, room_text
from edgeport.targets import Target
from edgeport.texts import chat_ids, reference_paragraph

# The most parameters a converter that builds the model part by part (Core ML's chunks) holds at once: it keeps the
# conversion of an 8B model within the memory of the machine that converts it.
PART_PARAMS = 400_000_000
# The most parameters the NPU shape's converter exports, calibrates and quantizes at once (a unit): torch's exporter
# holds four float32 copies of what it exports and onnxruntime's quantizer about as many, so a vocabulary's table
# larger than this (Llama-3.2-1B's 263M parameters) is a unit a slice of rows at a time.
UNIT_PARAMS = 128_000_000
ACTIVATION_CHUNK = 512  # prompt tokens whose activations the plan counts alive at once during prefill
FAST_TEXT_TOKENS = 64  # --parity fast: the first prompt and this much of the perplexity text

# Chat prompts every causal LM is checked on, with the perplexity text (texts.reference_paragraph).
# fit's sweep per format (ONNX's depends on the unit: see CausalLM.quantizations), most bits first
SWEEP = {
    "mlx": ("bf16", "q8", "q6", "mixed_4_6", "q4", "q4-g32", "mixed_3_6", "q3"),
    "coreml": ("fp16", "int8-channel", "int4-block32", "palettize4"),
    "gguf": quantization.LADDERS["gguf"],
}
PROMPTS = (
    "Summarize in one sentence: the meeting moved the product launch from March to May because testing found "
    "a memory leak in the audio pipeline.",
    "Write three short bullet points on why a laptop battery drains faster in cold weather.",
    "What is the capital of France, and what river runs through it?",
)


def text_config(config: dict) -> dict:
    """The language model's own config as transformers reads it: its defaults applied, and a multimodal config's
    text part (nested under text_config)."""
    return _transformers_config(json.dumps(config, sort_keys=True)).to_dict()


REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@functools.lru_cache(maxsize=64)
def _transformers_config(config_json: str):
    from transformers import AutoConfig

    config = json.loads(config_json)
    given = config.get("text_config") or config
    for size in REQUIRED_SIZES:  # transformers would fill in its own default for a model of another size
        if given.get(size) is None:
            raise EdgeportError(f"config.json lacks {size}, which the plan needs")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields).get_text_config()
    except Exception as e:  # its config classes validate fields strictly, in errors of their own
        raise EdgeportError(
            f"config.json: transformers cannot read it as a {config['model_type']} config "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from e


@dataclass(frozen=True)
class LMDims:
    """A decoder-only transformer's dimensions, as its config.json gives them (multimodal configs nest them)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    experts: int  # 0 for a dense model
    routed: int  # experts per token
    expert_intermediate: int
    shared_expert_intermediate: int
    tied: bool  # the output projection is the embedding

    @classmethod
    def from_config(cls, config: dict) -> "LMDims":
        try:
            hidden, layers = config["hidden_size"], config["num_hidden_layers"]
            heads, vocab = config["num_attention_heads"], config["vocab_size"]
        except KeyError as e:
            raise EdgeportError(f"config.json lacks {e.args[0]}, which the plan needs") from e
        intermediate = config.get("intermediate_size") or 0
        experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0
        return cls(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab=vocab,
            intermediate=intermediate,
            experts=experts,
            routed=config["num_experts_per_tok"] if experts else 0,
            expert_intermediate=(config.get("moe_intermediate_size") or intermediate) if experts else 0,
            shared_expert_intermediate=config.get("shared_expert_intermediate_size") or 0,
            tied=config.get("tie_word_embeddings", False),
        )

    def cache_shape(self, context_length: int) -> tuple[int, int, int, int, int]:
        """One of the K and V caches: layers, batch, KV heads, context, head dim."""
        return (self.layers, 1, self.kv_heads, context_length, self.head_dim)


@dataclass(frozen=True)
class ModelSize:
    params: int  # every weight
    active_params: int  # weights used per decoded token (MoE: only the routed experts)
    matrix_params: int  # weights in matrices (embeddings, projections, experts): what gets quantized
    active_matrix_params: int
    high_share: float  # share of matrix weights a mixed-precision recipe keeps at its high bits
    head_params: int  # the output projection (the embedding itself where the two are tied)
    tied: bool
    kv_values_per_token: int  # keys and values cached per token, over the layers that attend to the whole context
    windowed_kv: tuple[tuple[int, int], ...]  # (values per token, window) of sliding-window layers
    activation_bytes_per_token: int
    layers: int = 1  # decoder layers: what llama.cpp splits between a GPU's memory and the system's

    def kv_values(self, tokens: int) -> int:
        """Keys and values cached for `tokens` tokens: a sliding-window layer holds only its window."""
        return self.kv_values_per_token * tokens + sum(per * min(window, tokens) for per, window in self.windowed_kv)


def model_size(config: dict) -> ModelSize:
    """Parameter counts from the config alone, read as transformers reads it (its defaults applied): the sums below
    are each family's modeling code counted out, and a test holds them equal to the model transformers builds."""
    return _model_size(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _model_size(config_json: str) -> ModelSize:
    hf = _transformers_config(config_json)
    c, d = hf.to_dict(), LMDims.from_config(hf.to_dict())
    layer = _layer_counts(c, d)
    embedding = d.vocab * d.hidden
    lm_head = 0 if d.tied else embedding
    matrix = embedding + lm_head + sum(n.matrix for n in layer)
    vectors = d.hidden + sum(n.vectors for n in layer)  # the final norm, then each layer's
    idle_experts = sum(n.experts for n in layer) * (1 - d.routed / d.experts) if d.experts else 0
    # Decoding reads the output projection in full (the embedding itself when tied) but one embedding row.
    active_matrix = int(matrix - (0 if d.tied else embedding) - idle_experts)
    # mlx-lm's mixed recipes raise v_proj and down_proj in some layers, and an untied lm_head.
    high = sum(n.raised for n in layer) * mixed_recipe_layers(d.layers) / d.layers + lm_head
    full, windowed = _kv_layout(hf, d)
    active_intermediate = d.routed * d.expert_intermediate if d.experts else d.intermediate
    return ModelSize(
        params=matrix + vectors,
        active_params=active_matrix + vectors,
        matrix_params=matrix,
        active_matrix_params=active_matrix,
        high_share=high / matrix,
        head_params=embedding,
        tied=d.tied,
        kv_values_per_token=full,
        windowed_kv=windowed,
        activation_bytes_per_token=(d.vocab + 4 * d.hidden + 2 * active_intermediate) * 4,
        layers=d.layers,
    )


@dataclass(frozen=True)
class _LayerCount:
    matrix: int  # weights in matrices (a mixture's routed experts included)
    vectors: int  # norms, biases, attention sinks
    experts: int  # of `matrix`, the routed experts' (a token reads `routed` of them)
    raised: int  # of `matrix`, v_proj and down_proj: what mlx-lm's mixed recipes keep at more bits


QKV_BIAS = ("qwen2", "qwen2_moe")  # biases on the query, key and value projections, whatever attention_bias says
HEAD_NORMS = ("qwen3", "qwen3_moe", "gemma3_text")  # RMS norms over each head's queries and keys
FOUR_NORMS = ("gemma2", "gemma3_text")  # a norm before and after both attention and the MLP


def _layer_counts(c: dict, d: "LMDims") -> list[_LayerCount]:
    """Each decoder layer's weights, as the family's modeling code in transformers lays them out."""
    kind, hidden, hd = c["model_type"], d.hidden, d.head_dim
    q, kv = d.heads * hd, d.kv_heads * hd
    if c.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek)
        rope, nope, v = c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
        q_rank, kv_rank, per_head = c.get("q_lora_rank"), c["kv_lora_rank"], nope + rope
        query = hidden * q_rank + q_rank * d.heads * per_head if q_rank else hidden * d.heads * per_head
        attention = query + hidden * (kv_rank + rope) + kv_rank * d.heads * (nope + v) + d.heads * v * hidden
        attention_vectors, v_proj = (q_rank or 0) + kv_rank, 0
    else:
        attention, v_proj = 2 * hidden * q + 2 * hidden * kv, hidden * kv
        bias = (q + 2 * kv) if kind in QKV_BIAS else (q + 2 * kv + hidden) if c.get("attention_bias") else 0
        norms = 2 * hd if kind in HEAD_NORMS else q + kv if kind == "olmo2" else 0
        attention_vectors = bias + norms + (d.heads if kind == "gpt_oss" else 0)  # gpt-oss: a sink per head
    norms = (4 if kind in FOUR_NORMS else 2) * hidden
    dense = 3 * hidden * d.intermediate + ((2 * d.intermediate + hidden) if c.get("mlp_bias") else 0)
    counts = []
    for i in range(d.layers):
        if not (d.experts and _sparse(c, i)):
            counts.append(
                _LayerCount(attention + dense, attention_vectors + norms, 0, v_proj + hidden * d.intermediate)
            )
            continue
        inter, experts = d.expert_intermediate, d.experts
        routed = experts * 3 * hidden * inter
        shared = 3 * hidden * d.shared_expert_intermediate + (hidden if d.shared_expert_intermediate else 0)
        shared += 3 * hidden * inter * (c.get("n_shared_experts") or 0)
        vectors = attention_vectors + norms
        if kind == "gpt_oss":  # biases on the router and on every expert's projections (2-D, one row an expert)
            routed += experts * (2 * inter + hidden)
            vectors += experts
        counts.append(
            _LayerCount(attention + hidden * experts + routed + shared, vectors, routed, v_proj + routed // 3)
        )
    return counts


def _sparse(c: dict, layer: int) -> bool:
    """Whether decoder layer `layer` of a mixture of experts routes (DeepSeek keeps its first layers dense, Qwen's
    MoE can keep some)."""
    if layer < (c.get("first_k_dense_replace") or 0) or layer in (c.get("mlp_only_layers") or ()):
        return False
    step = c.get("decoder_sparse_step") or c.get("moe_layer_freq") or 1
    return (layer + 1) % step == 0 if "decoder_sparse_step" in c else layer % step == 0


def _kv_layout(hf, d: "LMDims") -> tuple[int, tuple[tuple[int, int], ...]]:
    """Values cached per token over the full-attention layers, and per sliding-window layer kind. Multi-head
    latent attention (DeepSeek) caches one compressed vector and the rotary key part per layer, as mlx-lm and
    llama.cpp keep it, not the keys and values it expands to."""
    latent = getattr(hf, "kv_lora_rank", None)
    per_layer = latent + hf.qk_rope_head_dim if latent else 2 * d.kv_heads * d.head_dim
    kinds = getattr(hf, "layer_types", None) or ["full_attention"] * d.layers
    window = getattr(hf, "sliding_window", None)
    sliding = sum(kind == "sliding_attention" for kind in kinds) if window else 0
    windowed = ((sliding * per_layer, window),) if sliding else ()
    return (d.layers - sliding) * per_layer, windowed


@dataclass(frozen=True)
class LayerSpan:
    """Layers [start, stop) of the decoder, built on their own, after the token embedding where `embedding` and
    before the final norm and the output projection (its own copy where the two are tied) where `head`. A span may
    hold the embedding or the head alone, and then only `rows` of the vocabulary: the head gives those tokens'
    logits, the embedding those tokens' rows and zeros for the others."""

    start: int
    stop: int
    params: int
    embedding: bool
    head: bool
    rows: tuple[int, int] | None = None


def layer_spans(config: dict, capacity: float, quant: quantization.Quantization | None = None) -> list[LayerSpan]:
    """The decoder's layers in the fewest consecutive spans of at most `capacity` each (a layer that is larger
    alone is a span of its own), balanced so that the largest span is as small as that count allows. The capacity
    is in parameters, or with `quant` in bytes as built: the layers at its bits, the embedding at its embedding bits
    and the output projection at its head bits."""
    params = weights = _span_params(config)
    if quant is not None:
        d, bits = LMDims.from_config(config), quant.bits_per_weight()
        table, layer = d.vocab * d.hidden, _layer_params(config)
        weights = [layer * bits / 8] * d.layers
        weights[0] += table * (quant.embedding_bits or bits) / 8
        weights[-1] += table * (quant.head_bits or bits) / 8 + d.hidden * NORM_BYTES_PER_VALUE
    layers = len(params)
    return [
        LayerSpan(start, stop, sum(params[start:stop]), start == 0, stop == layers)
        for start, stop in _balanced(weights, capacity)
    ]


def split_span(config: dict, first: int, end: int, max_params: float) -> list[LayerSpan]:
    """Layers [first, end), with the embedding where they start the decoder and the head where they end it, in the
    fewest consecutive spans of at most `max_params` each, balanced as layer_spans's. The embedding and the head
    count as blocks of their own, so each goes alone where it would not fit beside a layer."""
    d = LMDims.from_config(config)
    before = [d.vocab * d.hidden] if first == 0 else []
    after = [d.vocab * d.hidden + d.hidden] if end == d.layers else []
    blocks = [*before, *[_layer_params(config)] * (end - first), *after]
    low, high = len(before), len(blocks) - len(after)  # the layers' indices among the blocks

    def span(start: int, stop: int) -> LayerSpan:
        layers = first + max(start, low) - low, first + min(stop, high) - low
        return LayerSpan(*layers, sum(blocks[start:stop]), embedding=start < low, head=stop > high)

    spans = [span(start, stop) for start, stop in _balanced(blocks, max_params)]
    return [piece for s in spans for piece in _row_slices(s, d, max_params)]


def _row_slices(span: LayerSpan, d: LMDims, max_params: float) -> list[LayerSpan]:
    """`span` as is, or where it holds only a vocabulary's table larger than `max_params`, that table in the fewest
    even slices of rows within it (the head's each with the final norm)."""
    if span.start != span.stop or span.params <= max_params:
        return [span]
    most = max(1, int((max_params - (d.hidden if span.head else 0)) // d.hidden))
    step = math.ceil(d.vocab / math.ceil(d.vocab / most))
    return [
        replace(span, params=span.params - (d.vocab - (stop - start)) * d.hidden, rows=(start, stop))
        for start in range(0, d.vocab, step)
        for stop in [min(start + step, d.vocab)]
    ]


def _span_params(config: dict) -> list[int]:
    """Each layer's parameters as built on its own: the first with the token embedding, the last with the final
    norm and the output projection (its own copy where the two are tied)."""
    d = LMDims.from_config(config)
    params = [_layer_params(config)] * d.layers
    params[0] += d.vocab * d.hidden
    params[-1] += d.vocab * d.hidden + d.hidden
    return params


def _layer_params(config: dict) -> int:
    d, size = LMDims.from_config(config), model_size(config)
    return (size.params - d.vocab * d.hidden * (1 if d.tied else 2) - d.hidden) // d.layers


def _balanced(weights: list[float], capacity: float) -> list[tuple[int, int]]:
    """The fewest consecutive spans of `weights` within `capacity`, the largest as small as that count allows."""
    count = len(_greedy(weights, capacity))
    low, high = min(weights), float(capacity)
    while high - low > max(1.0, high * 1e-9):  # the smallest capacity that still needs no more spans
        middle = (low + high) / 2
        low, high = (low, middle) if len(_greedy(weights, middle)) <= count else (middle, high)
    return _greedy(weights, high)


def _greedy(weights: list[float], capacity: float) -> list[tuple[int, int]]:
    spans, start, total = [], 0, 0
    for i, weight in enumerate(weights):
        if i > start and total + weight > capacity:
            spans.append((start, i))
            start, total = i, 0
        total += weight
    return [*spans, (start, len(weights))]


def mixed_recipe_layers(layers: int) -> int:
    """How many of `layers` mlx-lm's mixed recipes raise: the first and last eighth, and every third layer between
    (counted in closed form, so a config's layer count costs nothing)."""
    first, last = layers // 8, 7 * layers // 8
    return first + (layers - last) + max(0, last - first) // 3


@dataclass
class Reference:
    """The source's logits for the parity inputs: computed once in a process of their own, stored in the output
    folder, and read back by each artifact's parity run."""

    inputs: list[list[int]]  # the chat prompts' token ids
    text: list[int]  # the perplexity text's token ids
    logits: list[np.ndarray]  # float32, one [tokens, vocab] array per prompt
    text_logits: np.ndarray
    engine: str
    level: str  # "full" | "fast"

    FILE: ClassVar[str] = "logits.safetensors"

    @classmethod
    def compute(cls, source, runner, level: str) -> "Reference":
        tokenizer = source.tokenizer
        inputs = [chat_ids(tokenizer, p) for p in PROMPTS[: 1 if level == "fast" else None]]
        text = tokenizer(reference_paragraph())["input_ids"][: FAST_TEXT_TOKENS if level == "fast" else None]
        logits = [runner.logits(ids) for ids in inputs]
        return cls(inputs, text, logits, runner.logits(text), runner.engine, level)

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"text.ids": np.asarray(self.text, np.int64), "text.logits": self.text_logits}
        for i, (ids, logits) in enumerate(zip(self.inputs, self.logits, strict=True)):
            tensors[f"prompt.{i}.ids"], tensors[f"prompt.{i}.logits"] = np.asarray(ids, np.int64), logits
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / self.FILE, metadata={"engine": self.engine, "level": self.level})

    @classmethod
    def read(cls, folder: Path) -> "Reference":
        from safetensors import safe_open

        with safe_open(folder / cls.FILE, "numpy") as f:
            names, metadata = f.keys(), f.metadata()
            tensors = {name: f.get_tensor(name) for name in names}
        prompts = range(sum(name.endswith(".ids") for name in tensors) - 1)
        return cls(
            inputs=[tensors[f"prompt.{i}.ids"].tolist() for i in prompts],
            text=tensors["text.ids"].tolist(),
            logits=[tensors[f"prompt.{i}.logits"] for i in prompts],
            text_logits=tensors["text.logits"],
            engine=metadata["engine"],
            level=metadata["level"],
        )


class CausalLM:
    name = "causal-lm"
    runs = "runs"  # "<target> runs <formats>"
    auto_model = "AutoModelForCausalLM"
    workload = "summarize"  # the module of edgeport.runtime that benches it
    metrics = ("top1_agreement", "kl_mean", "cosine_mean", "ppl_source", "ppl_artifact", "ppl_delta")
    speed_columns = ("prefill", "decode", "TTFT")
    metric_columns = ("top-1", "KL", "cosine", "ppl Δ")

    # The plan

    def dims(self, config: dict) -> LMDims:
        return LMDims.from_config(text_config(config))

    def formats(self, target: Target) -> tuple:
        return target.formats

    def quantizations(self, fmt: str, unit: str) -> tuple[str, ...]:
        """Every quantization `fit` sweeps for `fmt` on `unit`: what its converter builds for a causal LM."""
        if fmt == "onnx":
            return ("w8a16", "w4a16") if unit == "npu" else ("fp32", "int4-block32", "int4-block64", "int4-block128")
        return SWEEP[fmt]

    def size(self, config: dict) -> ModelSize:
        return model_size(text_config(config))

    def footprint(self, config: dict, context_length: int, target: Target) -> Footprint:
        """A block is a layer or the embedding (or output projection), whichever is larger; the paged reference
        holds a layer (it streams the tables); transformers fuses MoE experts when loading, so their checkpoint
        cannot be paged. A part is the largest span of PART_PARAMS, a unit the largest the NPU shape is exported in,
        an NPU part the largest of the target's NPU shape."""
        d, size = self.dims(config), self.size(config)
        per_layer = (size.matrix_params - d.vocab * d.hidden * (1 if d.tied else 2)) // d.layers
        cache = 2 * 4 * d.layers * d.kv_heads * d.head_dim * context_length
        part = max(span.params for span in self.parts(config, PART_PARAMS))
        unit = max(span.params for span in self.units(config, 0, d.layers, UNIT_PARAMS))
        npu_parts = {
            quant.name: max(span.params for span in self.npu_parts(config, target, quant))
            for quant in map(quantization.lookup, quantization.LADDERS["onnx"])
            if quant.activation_bits
        }
        return Footprint(max(d.vocab * d.hidden, per_layer), per_layer, not d.experts, cache, part, unit, npu_parts)

    def parts(self, config: dict, capacity: float, quant: quantization.Quantization | None = None) -> list[LayerSpan]:
        return layer_spans(text_config(config), capacity, quant)

    def npu_parts(self, config: dict, target: Target, quant: quantization.Quantization) -> list[LayerSpan]:
        """The parts of the NPU shape for `target`: each within its `qnn_part_gb` of weights as built (or
        PART_PARAMS parameters where it has none), as few as that allows."""
        if target.qnn_part_gb:
            return self.parts(config, target.qnn_part_gb * GB, quant)
        return self.parts(config, PART_PARAMS)

    def units(self, config: dict, first: int, end: int, max_params: float) -> list[LayerSpan]:
        return split_span(text_config(config), first, end, max_params)

    def context_length(self, source, target: Target) -> int:
        return target.context_length

    def prompt_tokens(self, target: Target) -> int:
        return target.budget.prompt_tokens

    def step(self, size: ModelSize, target: Target, fmt: str, quant_name: str, unit: str) -> Step:
        engine, efficiency = ENGINES[(fmt, unit)], calibration.efficiency(fmt, unit, target.name, target.backend(unit))
        ladder = {q: _figures(size, target, q, fmt, engine, efficiency, unit) for q in quantization.LADDERS[fmt]}
        f = ladder.get(quant_name) or _figures(size, target, quant_name, fmt, engine, efficiency, unit)
        usable = target.usable_ram_gb * GB
        largest = next((q for q, other in ladder.items() if other.peak <= usable), None)
        meeting = next((q for q, other in ladder.items() if not other.misses(target)), None)
        return Step(
            format=fmt,
            quantization=quant_name,
            unit=unit,
            weight_bytes=f.weights,
            kv_bytes=f.kv,
            peak_bytes=f.peak,
            prefill_tps=round(f.prefill_tps, 1),
            decode_tps=round(f.decode_tps, 1),
            ttft_s=round(f.ttft_s, 3),
            fits=f.peak <= usable,
            verdict=_verdict(f, target, fmt, largest, meeting),
            largest_fitting=largest,
            meets_budget=not f.misses(target),
            misses="; ".join(f.misses(target)),
            prefill_roofline_tps=round(f.prefill_roofline_tps, 1),
            decode_roofline_tps=round(f.decode_roofline_tps, 1),
            calibration=efficiency.describe(engine),
            gpu_layers=f.split.gpu_layers if f.split else None,
            vram_bytes=f.split.vram if f.split else None,
        )

    # Parity

    def check_inputs(self, source) -> None:
        """Before any work: a tokenizer or chat template that cannot run fails now, not after a conversion."""
        chat_ids(source.tokenizer, PROMPTS[0])

    def reference(self, source, level: str) -> Reference:
        from edgeport.engines.reference import TorchRunner

        return Reference.compute(source, TorchRunner(source), level)

    def read_reference(self, folder: Path) -> Reference:
        return Reference.read(folder)

    def measure(self, reference: Reference, runner, quant: str, not_checked: str | None = None) -> Parity:
        """Compare `runner` (one artifact) with the reference on the same tokens."""
        agree, kl, cos = [], [], []  # per position, an input at a time: its [tokens, vocab] logits go before the next's
        for ids, ref in zip(reference.inputs, reference.logits, strict=True):
            art = runner.logits(ids)
            agree.append(ref.argmax(-1) == art.argmax(-1))
            kl.append(kl_divergence(ref, art))
            cos.append(cosine(ref, art))
            del art
        ppl_source = perplexity(reference.text_logits, reference.text)
        ppl_artifact = perplexity(runner.logits(reference.text), reference.text)
        metrics = {
            "tokens": sum(len(ids) for ids in reference.inputs),
            "top1_agreement": round(float(np.mean(np.concatenate(agree))), 4),
            "kl_mean": round(float(np.mean(np.concatenate(kl))), 5),
            "cosine_mean": round(float(np.mean(np.concatenate(cos))), 5),
            "ppl_source": round(ppl_source, 3),
            "ppl_artifact": round(ppl_artifact, 3),
            "ppl_delta": round((ppl_artifact - ppl_source) / ppl_source, 4),
        }
        bounds = bounds_for(quant)
        judged = [
            Metric("top1_agreement", metrics["top1_agreement"], bounds.top1_agreement, at_least=True),
            Metric("kl_mean", metrics["kl_mean"], bounds.kl_mean),
            Metric("ppl_delta", metrics["ppl_delta"], bounds.ppl_delta),
        ]
        return judge(metrics, judged, f"source: {reference.engine}; artifact: {runner.engine}", not_checked)

    # What a person reads

    def plan_speeds(self, step: Step) -> list[str]:
        return [f"{step.prefill_tps:,.0f}", f"{step.decode_tps:,.0f}", f"{step.ttft_s:.2f} s"]

    def plan_rooflines(self, step: Step) -> str:
        return f"prefill {step.prefill_roofline_tps:,.0f}, decode {step.decode_roofline_tps:,.0f} tok/s"

    def plan_note(self, plan, kv: str) -> str:
        return (
            f"prefill and decode in tok/s; peak = weights + KV cache ({kv} at {plan.context_length} tokens) + "
            f"one prefill chunk + the engine's runtime where measured; TTFT at {plan.prompt_tokens} prompt tokens"
        )

    def metric_cells(self, metrics: dict, num) -> list[str]:
        return [
            num(metrics, "top1_agreement", ".3f"),
            num(metrics, "kl_mean", ".4f"),
            num(metrics, "cosine_mean", ".4f"),
            num(metrics, "ppl_delta", "+.1%"),
        ]

    def metric_notes(self, name: str, metrics: dict, num) -> list[str]:
        return [
            f"{name}: perplexity {num(metrics, 'ppl_source', '.2f')} (source) → {num(metrics, 'ppl_artifact', '.2f')}"
        ]


def weight_bytes(size: ModelSize, quant: quantization.Quantization, active: bool = False) -> float:
    """The bytes of every weight (or, `active`, of those a decoded token reads, which is one embedding row):
    matrices at the quantization's bits, the output projection at its head bits and the embedding at its embedding
    bits where it has them (then a tied table is held twice, as the NPU shape builds it), norms in fp16."""
    bits, table = quant.bits_per_weight(size.high_share), size.head_params
    head_bits = quant.head_bits or bits
    norms = (size.params - size.matrix_params) * NORM_BYTES_PER_VALUE
    if active:
        return ((size.active_matrix_params - table) * bits + table * head_bits) / 8 + norms
    rest = size.matrix_params - table * (1 if size.tied else 2)
    embedding = 0 if size.tied and quant.embedding_bits is None else table * (quant.embedding_bits or bits)
    return (rest * bits + table * head_bits + embedding) / 8 + norms


def decode_roofline_tps(size: ModelSize, quant, engine: Engine, cached_tokens: int, bandwidth_gbs: float) -> float:
    """Bandwidth over the bytes a decoded token reads: the active weights and `cached_tokens` of KV cache."""
    kv = size.kv_values(cached_tokens) * engine.kv_bytes
    return bandwidth_gbs * GB / (weight_bytes(size, engine.holding(quant), active=True) + kv)


def prefill_roofline_tps(size: ModelSize, tflops: float) -> float:
    return tflops * 1e12 / (2 * size.active_params)


@dataclass(frozen=True)
class _Figures:
    """One quantization of one format on a target: its memory and its speeds, expected and roofline."""

    weights: int
    kv: int
    peak: int
    prefill_tps: float
    prefill_roofline_tps: float
    decode_tps: float
    decode_roofline_tps: float
    ttft_s: float
    room: str
    split: "Split | None" = None  # llama.cpp's layers between a discrete GPU and RAM, on a target that has one

    def misses(self, target: Target) -> list[str]:
        """The budget lines these figures miss, in words."""
        budget, missed = target.budget, []
        if budget.peak_memory_gb and self.peak > budget.peak_memory_gb * GB:
            missed.append(f"peak {self.peak / GB:.2f} GB misses the {budget.peak_memory_gb:g} GB memory budget")
        elif self.peak > target.usable_ram_gb * GB:
            missed.append(f"needs {self.room}")
        if budget.decode_tps and self.decode_tps < budget.decode_tps:
            missed.append(f"decode ≈ {self.decode_tps:.1f} tok/s misses the {budget.decode_tps:g} tok/s budget")
        if budget.ttft_s and self.ttft_s > budget.ttft_s:
            missed.append(f"TTFT ≈ {self.ttft_s:.2f} s misses the {budget.ttft_s:g} s budget")
        return missed


def memory(size: ModelSize, quant, engine: Engine, context: int) -> tuple[int, int, int]:
    """Weight bytes, KV cache bytes over `context` tokens, and the peak: the weights as the engine holds them, the
    cache, one prefill chunk's activations and the engine's own runtime."""
    weights = int(weight_bytes(size, quant))
    kv = size.kv_values(context) * engine.kv_bytes
    activations = size.activation_bytes_per_token * min(ACTIVATION_CHUNK, context)
    held = int(weight_bytes(size, engine.holding(quant)))
    return weights, kv, held + kv + activations + engine.runtime_bytes


def _figures(size: ModelSize, target: Target, quant_name: str, fmt: str, engine: Engine, efficiency, unit: str):
    quant = quantization.get(quant_name, fmt)
    weights, kv, peak = memory(size, quant, engine, target.context_length)
    prompt = target.budget.prompt_tokens
    cached = target.context_length if engine.static_cache else min(prompt, target.context_length)
    decode_roofline = decode_roofline_tps(size, quant, engine, cached, target.bandwidth_gbs)
    prefill_roofline = prefill_roofline_tps(size, target.tflops[unit])
    prefill = efficiency.prefill_tps(prefill_roofline)
    split = None
    if fmt == "gguf" and unit == "gpu" and target.vram_gb:
        split = offload(
            size,
            quant,
            engine,
            target,
            efficiency,
            calibration.efficiency(fmt, "cpu", target.name, target.backend("cpu")),
        )
        peak, decode_roofline = split.ram, split.decode_roofline_tps
    return _Figures(
        weights=weights,
        kv=kv,
        peak=peak,
        prefill_tps=prefill,
        prefill_roofline_tps=prefill_roofline,
        decode_tps=split.decode_tps if split else efficiency.decode_tps(decode_roofline),
        decode_roofline_tps=decode_roofline,
        ttft_s=prompt / prefill + (split.copy_seconds(prompt, target) if split else 0),
        room=room_text(peak, target) + (f"; {split.describe(target)}" if split else ""),
        split=split,
    )


VRAM_USABLE = 0.9  # of a discrete GPU's memory: the driver, the display and the CUDA context keep the rest
UBATCH_TOKENS = 512  # llama.cpp's n_ubatch: the tokens of a prompt computed at once


@dataclass(frozen=True)
class Split:
    """llama.cpp's `n_gpu_layers`: decoder layers whose weights and KV cache sit in the GPU's memory, the rest (and
    the input embedding, which llama.cpp never offloads) in RAM; with every layer offloaded, the output projection
    too."""

    gpu_layers: int
    layers: int
    vram: int  # bytes
    ram: int  # bytes, the process's share of system memory
    ram_layers: int  # bytes of the decoder layers left in RAM
    all_in_vram: int  # bytes every layer and the output projection would take there
    decode_tps: float
    decode_roofline_tps: float

    def copy_seconds(self, prompt: int, target: Target) -> float:
        """What a prompt adds to prefill: llama.cpp computes a matrix product over 32 tokens or more on the GPU,
        copying the weights of the layers held in RAM across PCIe for each batch of UBATCH_TOKENS (ggml-cuda's
        offload_op; described in ikawrakow/ik_llama.cpp#405 and #520)."""
        return math.ceil(prompt / UBATCH_TOKENS) * self.ram_layers / (target.pcie_gbs * GB)

    def describe(self, target: Target) -> str:
        where = f"n_gpu_layers={self.gpu_layers} of {self.layers}"
        if self.gpu_layers < self.layers:
            where += f" (all would need {self.all_in_vram / GB:.1f} GB of VRAM)"
        return f"{where}: {self.vram / GB:.2f} GB of the GPU's {target.vram_gb:g} GB"


def offload(size: ModelSize, quant, engine: Engine, target: Target, gpu, cpu) -> Split:
    """The split of `size` at `quant` that puts the most layers in the GPU's usable memory. A decoded token reads
    each side's share of the weights and KV cache at that side's bandwidth, at the efficiency llama.cpp reaches
    there (`gpu`, `cpu`): seconds a token = GPU share / (VRAM bandwidth x its efficiency) + the rest / (RAM
    bandwidth x the CPU's) + the GPU's fixed cost."""
    layers, context = size.layers, target.context_length
    bits = quant.bits_per_weight(size.high_share)
    head = size.head_params * (quant.head_bits or bits) / 8  # the output projection, read by every token
    embedding = 0 if size.tied else size.head_params * bits / 8  # one row read a token: counted as held, not read
    layer = (weight_bytes(size, quant) - head - embedding) / layers
    layer_read = (weight_bytes(size, quant, active=True) - head) / layers
    kv_layer = size.kv_values(context) * engine.kv_bytes / layers
    kv_read = size.kv_values(min(target.budget.prompt_tokens, context)) * engine.kv_bytes / layers
    chunk = size.activation_bytes_per_token * min(ACTIVATION_CHUNK, context)

    def vram(k: int) -> float:
        return k * (layer + kv_layer) + (head if k == layers else 0) + (chunk if k else 0)

    gpu_layers = next(k for k in range(layers, -1, -1) if vram(k) <= target.vram_gb * GB * VRAM_USABLE)
    on_gpu = gpu_layers == layers
    total = weight_bytes(size, quant) + layers * kv_layer + chunk
    gpu_read = gpu_layers * (layer_read + kv_read) + (head if on_gpu else 0)
    cpu_read = (layers - gpu_layers) * (layer_read + kv_read) + (0 if on_gpu else head)
    gpu_s, cpu_s = gpu_read / (target.vram_bandwidth_gbs * GB), cpu_read / (target.bandwidth_gbs * GB)
    expected = gpu_s / gpu.decode + cpu_s / cpu.decode + (gpu.token_s if gpu_layers else cpu.token_s)
    return Split(
        gpu_layers=gpu_layers,
        layers=layers,
        vram=int(vram(gpu_layers)),
        ram=int(total - gpu_layers * (layer + kv_layer) - (head if on_gpu else 0)),
        ram_layers=int((layers - gpu_layers) * layer),
        all_in_vram=int(vram(layers)),
        decode_tps=1 / expected,
        decode_roofline_tps=1 / (gpu_s + cpu_s),
    )


def _verdict(f: _Figures, target: Target, fmt: str, largest: str | None, meeting: str | None) -> str:
    """Memory, decode and TTFT against the budget, each met or missed with its figure, and what would meet them."""
    missed = f.misses(target)
    if meeting:
        remedy = f"; {meeting} would meet the whole budget"
    elif f.peak > target.usable_ram_gb * GB:
        remedy = f"; {largest} would fit, but no {fmt} quantization meets the whole budget" if largest else ""
    else:
        remedy = f"; no {fmt} quantization meets the whole budget"
    if f.peak > target.usable_ram_gb * GB:
        return "does not fit: " + "; ".join(missed) + remedy
    if missed:
        return f"fits: {f.room}, but " + "; ".join(missed) + remedy
    met = [f"fits: {f.room}"]
    if target.budget.decode_tps:
        met.append(f"decode ≈ {f.decode_tps:.1f} tok/s meets {target.budget.decode_tps:g}")
    if target.budget.ttft_s:
        met.append(f"TTFT ≈ {f.ttft_s:.2f} s meets {target.budget.ttft_s:g} s")
    return "; ".join(met)
