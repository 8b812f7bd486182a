"""Source x Target -> Plan: what to build for a device, and what it will cost there.

Every prediction is one formula in this module (the README's "How the plan predicts" spells them out):
- weight bytes  = matrix weights x bits per weight / 8 + norms in fp16
- KV bytes      = 2 (K and V) x layers x KV heads x head dim x 2 bytes x the target's context length
- peak memory   = weights + KV cache + one prefill chunk of activations (fp32 logits dominate)
- decode tok/s  = memory bandwidth / bytes read per token (active weights + KV cache of the prompt): a roofline
- prefill tok/s = unit throughput / (2 x active parameters): a compute roofline
- TTFT          = budget prompt length / prefill tok/s
Mixture-of-experts models hold every expert in memory but read only the routed ones per token.

Whisper is planned per 30 s window of speech:
- KV bytes      = the decoder's self-attention cache (448 tokens) and cross-attention cache (1500 frames), fp16
- peak memory   = weights + KV caches + the encoder's activations for one window (attention scores dominate)
- encoder time  = 2 x encoder parameters x 1500 frames / unit throughput: a compute roofline
- decode tok/s  = memory bandwidth / (decoder weights + KV caches read per token): a roofline
- RTF           = (encoder time + TOKENS_PER_WINDOW / decode tok/s) / 30 s; TTFT is the encoder time plus one token
"""

from dataclasses import MISSING, asdict, dataclass, fields
from typing import get_args, get_type_hints

from edgeport import quantization
from edgeport.errors import EdgeportError
from edgeport.source import Source
from edgeport.targets import Target

KV_BYTES_PER_VALUE = 2  # fp16 KV cache
NORM_BYTES_PER_VALUE = 2
PREFILL_CHUNK = 512  # tokens whose activations are alive at once during prefill
GB = 1e9
WINDOW_S = 30.0
TOKENS_PER_WINDOW = 100  # English speech at about 150 words a minute, 1.3 tokens a word


@dataclass(frozen=True)
class ModelSize:
    params: int  # every weight
    active_params: int  # weights used per decoded token (MoE: only the routed experts)
    matrix_params: int  # weights in matrices (embeddings, projections, experts): what gets quantized
    active_matrix_params: int
    high_share: float  # share of matrix weights a mixed-precision recipe keeps at its high bits
    kv_bytes_per_token: int
    activation_bytes_per_token: int


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
        steps = [Step(**_typed_fields(Step, step, f"{where}.steps[{i}]")) for i, step in enumerate(steps)]
        return cls(**_typed_fields(cls, data, where, skip="steps"), steps=steps)


def _typed_fields(cls, data, where: str, skip: str = "") -> dict:
    """The fields of dataclass `cls` found in `data`, each of its declared type (a float may be given as an int)."""
    if not isinstance(data, dict):
        raise EdgeportError(f"{where}: not an object")
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name == skip or (f.name not in data and f.default is not MISSING):
            continue
        allowed = get_args(hints[f.name]) or (hints[f.name],)
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
    speech = source.family == "whisper"
    size = whisper_size(source.config) if speech else model_size(source.text_config)
    offered = target.speech_formats if speech else target.formats
    preferences = [f for f in offered if formats is None or f.name in formats]
    if not preferences:
        runs = "runs Whisper as" if speech else "runs"
        names = ", ".join(f.name for f in offered)
        raise EdgeportError(f"--formats {','.join(formats or [])}: {target.name} {runs} {names}")
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
    make_step = _speech_step if speech else _step
    steps = [
        make_step(size, target, pref.name, quant if pref.name in quant_formats else pref.quantization, pref.unit)
        for pref in preferences
    ]
    return Plan(
        source=source.ref,
        model_type=source.model_type,
        params=size.params,
        active_params=size.params if speech else size.active_params,
        target=target.name,
        ram_gb=target.ram_gb,
        usable_ram_gb=round(target.usable_ram_gb, 2),
        bandwidth_gbs=target.bandwidth_gbs,
        context_length=source.config["max_target_positions"] if speech else target.context_length,
        prompt_tokens=0 if speech else target.budget.prompt_tokens,
        steps=steps,
        family=source.family,
    )


def model_size(config: dict) -> ModelSize:
    """Parameter counts from a transformers config alone (no weights needed)."""
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, vocab = config["num_attention_heads"], config["vocab_size"]
    except KeyError as e:
        raise EdgeportError(f"config.json lacks {e.args[0]}, which the plan needs") from e
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    intermediate = config.get("intermediate_size", 0)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        expert_intermediate = config.get("moe_intermediate_size") or intermediate
        routed = config["num_experts_per_tok"]
        shared = 3 * hidden * config.get("shared_expert_intermediate_size", 0)
        router = hidden * experts
        mlp = experts * 3 * hidden * expert_intermediate + router + shared
        active_mlp = routed * 3 * hidden * expert_intermediate + router + shared
        down = experts * hidden * expert_intermediate
        active_intermediate = routed * expert_intermediate
    else:
        mlp = active_mlp = 3 * hidden * intermediate
        down, active_intermediate = hidden * intermediate, intermediate
    embedding = vocab * hidden
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    norms = (2 * layers + 1) * hidden
    matrix = embedding + lm_head + layers * (attention + mlp)
    # Decoding reads the output projection in full (the embedding itself when tied) but one embedding row.
    active_matrix = (lm_head or embedding) + layers * (attention + active_mlp)
    # mlx-lm's mixed recipes raise v_proj and down_proj in these layers, and an untied lm_head.
    upgraded = mixed_recipe_layers(layers)
    high = upgraded * (hidden * kv_heads * head_dim + down) + lm_head
    return ModelSize(
        params=matrix + norms,
        active_params=active_matrix + norms,
        matrix_params=matrix,
        active_matrix_params=active_matrix,
        high_share=high / matrix,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * KV_BYTES_PER_VALUE,
        activation_bytes_per_token=(vocab + 4 * hidden + 2 * active_intermediate) * 4,
    )


def mixed_recipe_layers(layers: int) -> int:
    """How many of `layers` mlx-lm's mixed recipes raise: the first and last eighth, and every third layer between
    (counted in closed form, so a config's layer count costs nothing)."""
    first, last = layers // 8, 7 * layers // 8
    return first + (layers - last) + max(0, last - first) // 3


@dataclass(frozen=True)
class WhisperSize:
    params: int
    matrix_params: int  # what gets quantized: projections, convolutions, token embedding
    frames: int  # encoder positions per 30 s window
    encoder_params: int
    decoder_matrix_params: int  # read per decoded token (the embedding doubles as the output projection)
    kv_bytes: int  # self-attention cache of max_target_positions tokens + cross-attention cache of one window
    activation_bytes: int  # the encoder's largest live tensors for one window


def whisper_size(config: dict) -> WhisperSize:
    """Parameter counts of a Whisper model from its config alone."""
    try:
        d, vocab, mels = config["d_model"], config["vocab_size"], config["num_mel_bins"]
        enc, dec = config["encoder_layers"], config["decoder_layers"]
        ffn_e, ffn_d = config["encoder_ffn_dim"], config["decoder_ffn_dim"]
        frames, tokens = config["max_source_positions"], config["max_target_positions"]
        heads = config["encoder_attention_heads"]
    except KeyError as e:
        raise EdgeportError(f"config.json lacks {e.args[0]}, which the plan needs") from e
    convs = 3 * mels * d + 3 * d * d
    encoder_matrix = convs + enc * (4 * d * d + 2 * d * ffn_e)
    decoder_matrix = vocab * d + dec * (8 * d * d + 2 * d * ffn_d)
    # positions, then per layer the biases (k_proj has none) and norms, then the conv biases and final norms
    vectors = (frames + tokens) * d + enc * (8 * d + ffn_e) + dec * (13 * d + ffn_d) + 6 * d
    return WhisperSize(
        params=encoder_matrix + decoder_matrix + vectors,
        matrix_params=encoder_matrix + decoder_matrix,
        frames=frames,
        encoder_params=encoder_matrix + frames * d,
        decoder_matrix_params=decoder_matrix,
        kv_bytes=2 * dec * (tokens + frames) * d * KV_BYTES_PER_VALUE,
        activation_bytes=(heads * frames * frames + frames * (4 * d + ffn_e)) * 4,
    )


def _speech_step(size: WhisperSize, target: Target, fmt: str, quant_name: str, unit: str) -> Step:
    bits = quantization.get(quant_name, fmt).bits_per_weight()
    weights, peak = _speech_memory(size, quant_name, fmt)
    encode_s = 2 * size.encoder_params * size.frames / (target.tflops[unit] * 1e12)
    decode_tps = target.bandwidth_gbs * GB / (size.decoder_matrix_params * bits / 8 + size.kv_bytes)
    rtf = (encode_s + TOKENS_PER_WINDOW / decode_tps) / WINDOW_S
    usable = target.usable_ram_gb * GB
    fits = peak <= usable
    largest = next((q for q in quantization.LADDERS[fmt] if _speech_memory(size, q, fmt)[1] <= usable), None)
    room = f"{peak / GB:.2f} GB of the {target.usable_ram_gb:.1f} GB an app may use on {target.ram_gb:g} GB"
    if not fits:
        verdict = f"does not fit: needs {room}" + (f"; {largest} would fit" if largest else "")
    elif target.budget.rtf and rtf > target.budget.rtf:
        verdict = f"fits: {room}, but RTF ≥ {rtf:.3f} misses the {target.budget.rtf:g} budget"
    else:
        verdict = f"fits: {room}"
    return Step(
        format=fmt,
        quantization=quant_name,
        unit=unit,
        weight_bytes=weights,
        kv_bytes=size.kv_bytes,
        peak_bytes=peak,
        prefill_tps=round(size.frames / encode_s, 1),
        decode_tps=round(decode_tps, 1),
        ttft_s=round(encode_s + 1 / decode_tps, 4),
        fits=fits,
        verdict=verdict,
        largest_fitting=largest,
        rtf=round(rtf, 5),
    )


def _speech_memory(size: WhisperSize, quant_name: str, fmt: str) -> tuple[int, int]:
    """Weight bytes and peak bytes of Whisper at a quantization."""
    bits = quantization.get(quant_name, fmt).bits_per_weight()
    weights = int(size.matrix_params * bits / 8 + (size.params - size.matrix_params) * NORM_BYTES_PER_VALUE)
    return weights, weights + size.kv_bytes + size.activation_bytes


def _step(size: ModelSize, target: Target, fmt: str, quant_name: str, unit: str) -> Step:
    quant = quantization.get(quant_name, fmt)
    weight_bytes, kv_bytes, peak_bytes = _memory(size, target, quant)
    bits = quant.bits_per_weight(size.high_share)
    bytes_per_token = size.active_matrix_params * bits / 8 + size.kv_bytes_per_token * target.budget.prompt_tokens
    decode_tps = target.bandwidth_gbs * GB / bytes_per_token
    prefill_tps = target.tflops[unit] * 1e12 / (2 * size.active_params)
    usable = target.usable_ram_gb * GB
    fits = peak_bytes <= usable
    largest = next(
        (q for q in quantization.LADDERS[fmt] if _memory(size, target, quantization.get(q, fmt))[2] <= usable), None
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


def _memory(size: ModelSize, target: Target, quant: quantization.Quantization) -> tuple[int, int, int]:
    norms = size.params - size.matrix_params
    weights = int(size.matrix_params * quant.bits_per_weight(size.high_share) / 8 + norms * NORM_BYTES_PER_VALUE)
    kv = size.kv_bytes_per_token * target.context_length
    activations = size.activation_bytes_per_token * min(PREFILL_CHUNK, target.context_length)
    return weights, kv, weights + kv + activations


def _verdict(fits: bool, peak: int, decode_tps: float, target: Target, largest: str | None) -> str:
    room = f"{peak / GB:.2f} GB of the {target.usable_ram_gb:.1f} GB an app may use on {target.ram_gb:g} GB"
    if not fits:
        fallback = f"; {largest} would fit" if largest else "; no quantization of this format fits"
        return f"does not fit: needs {room}{fallback}"
    slow = target.budget.decode_tps and decode_tps < target.budget.decode_tps
    speed = (
        f", but decode ≤ {decode_tps:.0f} tok/s misses the {target.budget.decode_tps:g} tok/s budget" if slow else ""
    )
    return f"fits: {room}{speed}"
