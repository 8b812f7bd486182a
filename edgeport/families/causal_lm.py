"""The causal LM family: its dimensions read from config.json, what the plan predicts for it, how parity judges an
artifact of it (logits on chat prompts and perplexity on real text), its bench workload and its table columns.

The plan's formulas for it (the README's "How the plan predicts" spells them out):
- weight bytes  = matrix weights x bits per weight / 8 + norms in fp16
- KV bytes      = 2 (K and V) x layers x KV heads x head dim x 2 bytes x the target's context length
- peak memory   = weights + KV cache + one prefill chunk of activations (fp32 logits dominate)
- decode tok/s  = memory bandwidth / bytes read per token (active weights + KV cache of the prompt): a roofline
- prefill tok/s = unit throughput / (2 x active parameters): a compute roofline
- TTFT          = budget prompt length / prefill tok/s
Mixture-of-experts models hold every expert in memory but read only the routed ones per token.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeport import quantization
from edgeport.errors import EdgeportError
from edgeport.parity import Metric, Parity, bounds_for, cosine, judge, kl_divergence, perplexity
from edgeport.plan import GB, KV_BYTES_PER_VALUE, NORM_BYTES_PER_VALUE, Footprint, Step, room_text
from edgeport.targets import Target
from edgeport.texts import chat_ids, reference_paragraph

# The most parameters a converter that builds the model part by part (Core ML's chunks) holds at once: it keeps the
# conversion of an 8B model within the memory of the machine that converts it.
PART_PARAMS = 400_000_000
ACTIVATION_CHUNK = 512  # prompt tokens whose activations the plan counts alive at once during prefill
FAST_TEXT_TOKENS = 64  # --parity fast: the first prompt and this much of the perplexity text

# Chat prompts every causal LM is checked on, with the perplexity text (texts.reference_paragraph).
PROMPTS = (
    "Summarize in one sentence: the meeting moved the product launch from March to May because testing found "
    "a memory leak in the audio pipeline.",
    "Write three short bullet points on why a laptop battery drains faster in cold weather.",
    "What is the capital of France, and what river runs through it?",
)


def text_config(config: dict) -> dict:
    """The language model's own config (multimodal configs nest it under text_config)."""
    return config.get("text_config") or config


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
        intermediate = config.get("intermediate_size", 0)
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
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
            shared_expert_intermediate=config.get("shared_expert_intermediate_size", 0),
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
    kv_bytes_per_token: int
    activation_bytes_per_token: int


def model_size(config: dict) -> ModelSize:
    """Parameter counts from a transformers config alone (no weights needed)."""
    d = LMDims.from_config(config)
    hidden = d.hidden
    attention = 2 * hidden * d.heads * d.head_dim + 2 * hidden * d.kv_heads * d.head_dim
    if d.experts:
        shared = 3 * hidden * d.shared_expert_intermediate
        router = hidden * d.experts
        mlp = d.experts * 3 * hidden * d.expert_intermediate + router + shared
        active_mlp = d.routed * 3 * hidden * d.expert_intermediate + router + shared
        down = d.experts * hidden * d.expert_intermediate
        active_intermediate = d.routed * d.expert_intermediate
    else:
        mlp = active_mlp = 3 * hidden * d.intermediate
        down, active_intermediate = hidden * d.intermediate, d.intermediate
    embedding = d.vocab * hidden
    lm_head = 0 if d.tied else d.vocab * hidden
    norms = (2 * d.layers + 1) * hidden
    matrix = embedding + lm_head + d.layers * (attention + mlp)
    # Decoding reads the output projection in full (the embedding itself when tied) but one embedding row.
    active_matrix = (lm_head or embedding) + d.layers * (attention + active_mlp)
    # mlx-lm's mixed recipes raise v_proj and down_proj in these layers, and an untied lm_head.
    upgraded = mixed_recipe_layers(d.layers)
    high = upgraded * (hidden * d.kv_heads * d.head_dim + down) + lm_head
    return ModelSize(
        params=matrix + norms,
        active_params=active_matrix + norms,
        matrix_params=matrix,
        active_matrix_params=active_matrix,
        high_share=high / matrix,
        kv_bytes_per_token=2 * d.layers * d.kv_heads * d.head_dim * KV_BYTES_PER_VALUE,
        activation_bytes_per_token=(d.vocab + 4 * hidden + 2 * active_intermediate) * 4,
    )


@dataclass(frozen=True)
class LayerSpan:
    """Layers [start, stop) of the decoder, built on their own: the first span takes the token embedding and the
    last one ends with the final norm and the output projection (its own copy where the two are tied)."""

    start: int
    stop: int
    params: int


def layer_spans(config: dict, max_params: float) -> list[LayerSpan]:
    """The decoder's layers in the fewest consecutive spans of at most `max_params` each (a layer that is larger
    alone is a span of its own), balanced so that the largest span is as small as that count allows."""
    d, size = LMDims.from_config(config), model_size(config)
    table = d.vocab * d.hidden
    layer = (size.params - table * (1 if d.tied else 2) - d.hidden) // d.layers
    weights = [layer] * d.layers
    weights[0] += table
    weights[-1] += table + d.hidden
    count = len(_greedy(weights, max_params))
    low, high = min(weights), int(max_params)
    while low < high:  # the smallest capacity that still needs no more spans
        middle = (low + high) // 2
        low, high = (low, middle) if len(_greedy(weights, middle)) <= count else (middle + 1, high)
    return [LayerSpan(start, stop, sum(weights[start:stop])) for start, stop in _greedy(weights, low)]


def _greedy(weights: list[int], capacity: float) -> list[tuple[int, int]]:
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

    def size(self, config: dict) -> ModelSize:
        return model_size(text_config(config))

    def footprint(self, config: dict, context_length: int) -> Footprint:
        """A block is a layer or the embedding (or output projection), whichever is larger; transformers fuses MoE
        experts when loading, so their checkpoint cannot be paged. A part is the largest span of PART_PARAMS."""
        d, size = self.dims(config), self.size(config)
        per_layer = (size.matrix_params - d.vocab * d.hidden * (1 if d.tied else 2)) // d.layers
        cache = 2 * 4 * d.layers * d.kv_heads * d.head_dim * context_length
        part = max(span.params for span in self.parts(config, PART_PARAMS))
        return Footprint(max(d.vocab * d.hidden, per_layer), not d.experts, cache, part)

    def parts(self, config: dict, max_params: float) -> list[LayerSpan]:
        return layer_spans(text_config(config), max_params)

    def context_length(self, source, target: Target) -> int:
        return target.context_length

    def prompt_tokens(self, target: Target) -> int:
        return target.budget.prompt_tokens

    def step(self, size: ModelSize, target: Target, fmt: str, quant_name: str, unit: str) -> Step:
        quant = quantization.get(quant_name, fmt)
        weight_bytes, kv_bytes, peak_bytes = _memory(size, target, quant)
        bits = quant.bits_per_weight(size.high_share)
        bytes_per_token = size.active_matrix_params * bits / 8 + size.kv_bytes_per_token * target.budget.prompt_tokens
        decode_tps = target.bandwidth_gbs * GB / bytes_per_token
        prefill_tps = target.tflops[unit] * 1e12 / (2 * size.active_params)
        usable = target.usable_ram_gb * GB
        fits = peak_bytes <= usable
        largest = next(
            (q for q in quantization.LADDERS[fmt] if _memory(size, target, quantization.get(q, fmt))[2] <= usable),
            None,
        )
        return Step(
            format=fmt,
            quantization=quant_name,
            unit=unit,
            weight_bytes=weight_bytes,
            kv_bytes=kv_bytes,
            peak_bytes=peak_bytes,
            prefill_tps=round(prefill_tps, 1),
            decode_tps=round(decode_tps, 1),
            ttft_s=round(target.budget.prompt_tokens / prefill_tps, 3),
            fits=fits,
            verdict=_verdict(fits, peak_bytes, decode_tps, target, largest),
            largest_fitting=largest,
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
        artifact_logits = [runner.logits(ids) for ids in reference.inputs]
        ref = np.concatenate(reference.logits)
        art = np.concatenate(artifact_logits)
        ppl_source = perplexity(reference.text_logits, reference.text)
        ppl_artifact = perplexity(runner.logits(reference.text), reference.text)
        metrics = {
            "tokens": int(ref.shape[0]),
            "top1_agreement": round(float(np.mean(ref.argmax(-1) == art.argmax(-1))), 4),
            "kl_mean": round(float(np.mean(kl_divergence(ref, art))), 5),
            "cosine_mean": round(float(np.mean(cosine(ref, art))), 5),
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

    def plan_note(self, plan, kv: str) -> str:
        return (
            f"prefill and decode in tok/s; peak = weights + KV cache ({kv} at {plan.context_length} tokens) + "
            f"one prefill chunk; TTFT at {plan.prompt_tokens} prompt tokens"
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


def _memory(size: ModelSize, target: Target, quant: quantization.Quantization) -> tuple[int, int, int]:
    norms = size.params - size.matrix_params
    weights = int(size.matrix_params * quant.bits_per_weight(size.high_share) / 8 + norms * NORM_BYTES_PER_VALUE)
    kv = size.kv_bytes_per_token * target.context_length
    activations = size.activation_bytes_per_token * min(ACTIVATION_CHUNK, target.context_length)
    return weights, kv, weights + kv + activations


def _verdict(fits: bool, peak: int, decode_tps: float, target: Target, largest: str | None) -> str:
    room = room_text(peak, target)
    if not fits:
        fallback = f"; {largest} would fit" if largest else "; no quantization of this format fits"
        return f"does not fit: needs {room}{fallback}"
    slow = target.budget.decode_tps and decode_tps < target.budget.decode_tps
    speed = (
        f", but decode ≤ {decode_tps:.0f} tok/s misses the {target.budget.decode_tps:g} tok/s budget" if slow else ""
    )
    return f"fits: {room}{speed}"
