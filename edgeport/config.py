"""A model's config.json checked as data before any arithmetic or library sees it: every size the plan and the
converters use is a whole number within sane bounds (no string, no bool, no NaN, nothing negative), token ids lie
in the vocabulary, and the sizes agree with each other. A refusal names the file and the field."""

from pathlib import Path

from edgeport.errors import EdgeportError

# field -> (smallest, largest) whole number. The bounds are far beyond any released model and far below what
# would make the plan's arithmetic or a library's allocation run away.
SIZES = {
    "hidden_size": (1, 2**17),
    "num_hidden_layers": (1, 2**12),
    "num_attention_heads": (1, 2**12),
    "num_key_value_heads": (1, 2**12),
    "head_dim": (1, 2**14),
    "intermediate_size": (1, 2**20),
    "vocab_size": (1, 2**23),
    "max_position_embeddings": (1, 2**27),
    "sliding_window": (1, 2**27),
    "num_local_experts": (0, 2**14),
    "num_experts": (0, 2**14),
    "num_experts_per_tok": (1, 2**10),
    "moe_intermediate_size": (1, 2**20),
    "shared_expert_intermediate_size": (0, 2**20),
    "d_model": (1, 2**17),
    "encoder_layers": (1, 2**10),
    "decoder_layers": (1, 2**10),
    "encoder_attention_heads": (1, 2**12),
    "decoder_attention_heads": (1, 2**12),
    "encoder_ffn_dim": (1, 2**20),
    "decoder_ffn_dim": (1, 2**20),
    "num_mel_bins": (1, 2**12),
    "max_source_positions": (1, 2**20),
    "max_target_positions": (1, 2**20),
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
TOKEN_LISTS = ("suppress_tokens", "begin_suppress_tokens")
PACKED_SLACK = 8
POSITIVE_FLOATS = {"rope_theta": 1e12, "rms_norm_eps": 1.0, "layer_norm_eps": 1.0}
DIVIDES = (  # (part, whole): whole must be a multiple of part, where both are given
    ("num_key_value_heads", "num_attention_heads"),
    ("encoder_attention_heads", "d_model"),
    ("decoder_attention_heads", "d_model"),
)


def check(config: dict, where: Path) -> dict:
    """`config` once every field edgeport reads is sound, its nested text_config included. A size given as null
    means not given (as in transformers), so it is dropped."""
    if not isinstance(config, dict):
        raise EdgeportError(f"{where}: expected a JSON object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise EdgeportError(f"{where}: has no model_type, so the architecture is unknown")
    config = {k: v for k, v in config.items() if not (k in SIZES and v is None)}
    nested = config.get("text_config")
    if nested is not None:
        if not isinstance(nested, dict):
            raise EdgeportError(f"{where}: text_config must be an object")
        config["text_config"] = check({"model_type": config["model_type"], **nested}, where)
    for field, (low, high) in SIZES.items():
        value = config.get(field)
        if value is not None and not _whole(value, low, high):
            raise EdgeportError(f"{where}: {field} must be a whole number from {low} to {high:,}, not {_show(value)}")
    divides = DIVIDES if config.get("head_dim") else (("num_attention_heads", "hidden_size"), *DIVIDES)
    for part, whole in divides:
        if config.get(part) and config.get(whole) and config[whole] % config[part]:
            raise EdgeportError(f"{where}: {whole} {config[whole]} is not a multiple of {part} {config[part]}")
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts and "num_experts_per_tok" not in config:
        raise EdgeportError(f"{where}: a mixture of {experts} experts needs num_experts_per_tok")
    if experts and config["num_experts_per_tok"] > experts:
        raise EdgeportError(
            f"{where}: num_experts_per_tok {config['num_experts_per_tok']} exceeds the {experts} experts"
        )
    vocab = config.get("vocab_size") or 2**23
    for field in TOKEN_IDS:
        ids = config.get(field)
        if ids is not None and not all(_whole(i, -1, vocab - 1) for i in (ids if isinstance(ids, list) else [ids])):
            raise EdgeportError(f"{where}: {field} must be token ids below vocab_size {vocab}, not {_show(ids)}")
    for field in TOKEN_LISTS:
        ids = config.get(field)
        if ids is not None and not (isinstance(ids, list) and all(_whole(i, 0, vocab - 1) for i in ids)):
            raise EdgeportError(f"{where}: {field} must be a list of token ids below {vocab}, not {_show(ids)}")
    for field, high in POSITIVE_FLOATS.items():
        value = config.get(field)
        if value is not None and not (_number(value) and 0 < value <= high):
            raise EdgeportError(f"{where}: {field} must be a number above 0 and at most {high:g}, not {_show(value)}")
    return config


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value) -> str:
    return repr(value)[:40]


def weights_hold(config: dict, values: int, where: Path) -> None:
    """Refuse a config that declares far more parameters than its weight files hold `values` (elements, or bytes):
    a library would allocate the difference. The slack covers weights packed eight to an element (int4 in int32)."""
    from edgeport.families import family_of

    declared = family_of(config["model_type"]).size(config).params
    if declared > PACKED_SLACK * values + 2**20:
        raise EdgeportError(
            f"{where}: its config declares {declared:,} parameters, but the weights hold only {values:,} values; "
            "is config.json from another model?"
        )
