"""A CTranslate2 (faster-whisper) Whisper folder read into Hugging Face layout.

`model.bin` is parsed field by field with every length checked against the file (no pickle, no code), its
fused attention projections are split back into q/k/v, and the result is saved as safetensors with a
transformers config, tokenizer and feature extractor: the layout every converter reads.
"""

import mmap
import re
from pathlib import Path

import numpy as np

from edgeport.config import check as check_config
from edgeport.config import weights_hold
from edgeport.errors import EdgeportError
from edgeport.files import read_json
from edgeport.headers import BoundedReader, regular_file, sane_shape

# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
MAX_RANK = 8
SMALL_VARIABLE_BYTES = 64  # scalars and flags: read even when only the header is wanted
# CTranslate2 variable -> transformers parameter; {0} is the layer. Fused projections are split in `_split`.
NAMES = (
    (r"encoder/conv(\d)/(weight|bias)", "model.encoder.conv{0}.{1}"),
    (r"(encoder|decoder)/position_encodings/encodings", "model.{0}.embed_positions.weight"),
    (r"(encoder|decoder)/layer_norm/(gamma|beta)", "model.{0}.layer_norm.{1}"),
    (r"decoder/embeddings/weight", "model.decoder.embed_tokens.weight"),
    (
        r"(encoder|decoder)/layer_(\d+)/self_attention/linear_1/(weight|bias)",
        "model.{0}.layers.{1}.self_attn.out_proj.{2}",
    ),
    (
        r"(encoder|decoder)/layer_(\d+)/self_attention/layer_norm/(gamma|beta)",
        "model.{0}.layers.{1}.self_attn_layer_norm.{2}",
    ),
    (r"decoder/layer_(\d+)/attention/linear_0/(weight|bias)", "model.decoder.layers.{0}.encoder_attn.q_proj.{1}"),
    (r"decoder/layer_(\d+)/attention/linear_2/(weight|bias)", "model.decoder.layers.{0}.encoder_attn.out_proj.{1}"),
    (r"decoder/layer_(\d+)/attention/layer_norm/(gamma|beta)", "model.decoder.layers.{0}.encoder_attn_layer_norm.{1}"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/linear_0/(weight|bias)", "model.{0}.layers.{1}.fc1.{2}"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/linear_1/(weight|bias)", "model.{0}.layers.{1}.fc2.{2}"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/layer_norm/(gamma|beta)", "model.{0}.layers.{1}.final_layer_norm.{2}"),
)
FUSED = (  # fused CTranslate2 projection -> the transformers projections it holds, in order
    (r"(encoder|decoder)/layer_(\d+)/self_attention/linear_0/(weight|bias)", "model.{0}.layers.{1}.self_attn.", "qkv"),
    (r"decoder/layer_(\d+)/attention/linear_1/(weight|bias)", "model.decoder.layers.{0}.encoder_attn.", "kv"),
)


def is_ct2_whisper(folder: Path) -> bool:
    return (folder / "model.bin").is_file() and "model_type" not in _json(folder / "config.json")


def read_model_bin(file: Path, values: bool = True) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables of a CTranslate2 model.bin, aliases resolved. Without `values`, only the
    small variables (scalars, flags) are read; the others come back as zero-byte arrays of their shape and dtype."""
    if regular_file(file).stat().st_size < 8:
        raise EdgeportError(f"{file}: not a valid CTranslate2 model file (too short); re-download it")
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = BoundedReader(data, file, "CTranslate2 model")
        version = reader.unpack("I")
        if not 1 <= version <= 6:
            raise reader.error(f"binary version {version}, which this reader does not know")
        spec = reader.string("H")
        reader.unpack("I")  # spec revision
        variables = {}
        for _ in range(reader.unpack("I")):
            name = reader.string("H")
            rank = reader.unpack("B")
            if rank > MAX_RANK:
                raise reader.error(f"{name} has rank {rank}")
            shape = [reader.unpack("I") for _ in range(rank)]
            if not sane_shape(shape):
                raise reader.error(f"{name} has a shape beyond any real tensor, {shape}")
            dtype_id = reader.unpack("B")
            if dtype_id >= len(DTYPES):
                raise reader.error(f"{name} has an unknown data type {dtype_id}")
            dtype, size = DTYPES[dtype_id], reader.unpack("I")
            count = int(np.prod(shape, dtype=object))
            if size != count * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize):
                raise reader.error(f"{name} has {size} bytes for shape {shape}")
            if values or size <= SMALL_VARIABLE_BYTES:
                variables[name] = _array(reader.take(size), dtype, shape)
            else:
                reader.skip(size)
                variables[name] = np.broadcast_to(np.zeros((), np.float32 if dtype == "bfloat16" else dtype), shape)
        for _ in range(reader.unpack("I")):
            alias, target = reader.string("H"), reader.string("H")
            if target not in variables:
                raise reader.error(f"alias {alias} names no variable ({target})")
            variables[alias] = variables[target]
    return spec, variables


def hf_config(folder: Path) -> dict:
    """The transformers config of the CTranslate2 Whisper model in `folder`, from model.bin's header alone."""
    return _whisper_config(folder, *read_model_bin(folder / "model.bin", values=False))[0].to_dict()


def to_hf(folder: Path, dest: Path) -> None:
    """Write the CTranslate2 Whisper model in `folder` as a transformers Whisper folder at `dest`."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()

    spec, variables = read_model_bin(folder / "model.bin")
    config, tokenizer = _whisper_config(folder, spec, variables)
    try:
        tensors = _hf_tensors(variables)
        model = WhisperForConditionalGeneration(config).to(torch.float16)
        state = {k: torch.from_numpy(v) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, ValueError, IndexError, RuntimeError) as e:  # a scale, a split or a shape that does not fit
        raise EdgeportError(f"{folder}/model.bin: weights do not fit Whisper ({str(e)[:200]})") from e
    if unexpected or set(missing) - {"proj_out.weight"}:  # the output projection is tied to the embedding
        raise EdgeportError(f"{folder}/model.bin: weights do not fit Whisper ({(unexpected or missing)[:3]})")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(dest)


def _whisper_config(folder: Path, spec: str, variables: dict):
    """The checked transformers WhisperConfig of a CTranslate2 model, and its tokenizer."""
    if spec != "WhisperSpec":
        raise EdgeportError(f"{folder}: a CTranslate2 {spec} model; edgeport reads CTranslate2 Whisper models only")
    tokenizer = _tokenizer(folder)
    config = _config(variables, _json(folder / "config.json"), tokenizer, folder)
    check_config(config.to_dict(), folder / "model.bin")
    weights_hold(config.to_dict(), (folder / "model.bin").stat().st_size, folder / "model.bin")
    return config, tokenizer


def _hf_tensors(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {}
    for name, value in variables.items():
        if name.endswith("weight_scale") or value.ndim == 0 or name.startswith("decoder/projection/"):
            continue  # scales are applied below; scalars are flags; the projection is the embedding
        if value.dtype == np.int8:  # int8 weights: one scale per output channel, q = round(w * scale)
            scale = variables[name + "_scale"].reshape(-1, *[1] * (value.ndim - 1))
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"{name}_scale holds a scale that is zero, negative or not finite")
            with np.errstate(over="ignore"):
                value = (value.astype(np.float32) / scale).astype(np.float16)
            if not np.isfinite(value).all():
                raise ValueError(f"{name} overflows float16 at its scales")
        for pattern, template, parts in FUSED:
            match = re.fullmatch(pattern, name)
            if match:
                prefix, kind = template.format(*match.groups()[:-1]), match.groups()[-1]
                for part, piece in zip(parts, np.split(value, len(parts)), strict=True):
                    if not (part == "k" and kind == "bias"):  # Whisper's k_proj has no bias (stored as zeros)
                        tensors[f"{prefix}{part}_proj.{kind}"] = piece
                break
        else:
            for pattern, template in NAMES:
                match = re.fullmatch(pattern, name)
                if match:
                    groups = [{"gamma": "weight", "beta": "bias"}.get(g, g) for g in match.groups()]
                    tensors[template.format(*groups)] = value
                    break
    return tensors


def _config(variables: dict, ct2_config: dict, tokenizer, folder: Path):
    from transformers import WhisperConfig

    def count(prefix):
        return len({m[1] for n in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", n))})

    try:
        vocab, d_model = variables["decoder/embeddings/weight"].shape
        ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
        mels = variables["encoder/conv1/weight"].shape[1]
        heads = {part: int(variables[f"{part}/num_heads"]) for part in ("encoder", "decoder")}
        frames = variables["encoder/position_encodings/encodings"].shape[0]
        tokens = variables["decoder/position_encodings/encodings"].shape[0]
    except KeyError as e:
        raise EdgeportError(f"{folder}/model.bin: not a Whisper model (no {e.args[0]})") from e
    except (ValueError, TypeError, IndexError) as e:
        raise EdgeportError(f"{folder}/model.bin: not a Whisper model (a variable of the wrong shape: {e})") from e
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mels,
        d_model=d_model,
        encoder_layers=count("encoder"),
        decoder_layers=count("decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_source_positions=frames,
        max_target_positions=tokens,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        tie_word_embeddings=True,
    )


def _tokenizer(folder: Path):
    from transformers import WhisperTokenizerFast

    file = regular_file(folder / "tokenizer.json")
    try:
        return WhisperTokenizerFast(tokenizer_file=str(file))
    except Exception as e:  # the tokenizers library reports a bad file in several types
        raise EdgeportError(f"{file}: not a tokenizer file (tokenizers says: {str(e)[:160]})") from e


def _array(raw, dtype, shape: list[int]) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the upper half of float32
        values = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        return values.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype).reshape(shape).copy()


def _json(file: Path) -> dict:
    data = read_json(file, "a CTranslate2 model folder has config.json beside model.bin")
    if not isinstance(data, dict):
        raise EdgeportError(f"{file}: expected a JSON object")
    return data
