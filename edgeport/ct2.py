"""A CTranslate2 (faster-whisper) Whisper folder read into Hugging Face layout.

`model.bin` is parsed field by field with every length checked against the file (no pickle, no code), its
fused attention projections are split back into q/k/v, and the result is saved as safetensors with a
transformers config, tokenizer and feature extractor: the layout every converter reads.
"""

import mmap
import re
import struct
from pathlib import Path

import numpy as np

from edgeport.errors import EdgeportError
from edgeport.files import read_json

# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
MAX_RANK = 8
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


def read_model_bin(file: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables of a CTranslate2 model.bin, aliases resolved."""
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _Reader(data, file)
        version = reader.unpack("I")
        if not 1 <= version <= 6:
            raise reader.error(f"binary version {version}, which this reader does not know")
        spec = reader.string()
        reader.unpack("I")  # spec revision
        variables = {}
        for _ in range(reader.unpack("I")):
            name = reader.string()
            rank = reader.unpack("B")
            if rank > MAX_RANK:
                raise reader.error(f"{name} has rank {rank}")
            shape = [reader.unpack("I") for _ in range(rank)]
            dtype_id = reader.unpack("B")
            if dtype_id >= len(DTYPES):
                raise reader.error(f"{name} has an unknown data type {dtype_id}")
            size = reader.unpack("I")
            raw = reader.take(size)
            variables[name] = _array(raw, DTYPES[dtype_id], shape, name, reader)
        for _ in range(reader.unpack("I")):
            alias, target = reader.string(), reader.string()
            if target not in variables:
                raise reader.error(f"alias {alias} names no variable ({target})")
            variables[alias] = variables[target]
    return spec, variables


def to_hf(folder: Path, dest: Path) -> None:
    """Write the CTranslate2 Whisper model in `folder` as a transformers Whisper folder at `dest`."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()

    spec, variables = read_model_bin(folder / "model.bin")
    if spec != "WhisperSpec":
        raise EdgeportError(f"{folder}: a CTranslate2 {spec} model; edgeport reads CTranslate2 Whisper models only")
    ct2_config = _json(folder / "config.json")
    tokenizer = _tokenizer(folder)
    tensors = _hf_tensors(variables)
    config = _config(variables, ct2_config, tokenizer, folder)
    model = WhisperForConditionalGeneration(config).to(torch.float16)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:  # the output projection is tied to the embedding
        raise EdgeportError(f"{folder}/model.bin: weights do not fit Whisper ({(unexpected or missing)[:3]})")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(dest)


def _hf_tensors(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {}
    for name, value in variables.items():
        if name.endswith("weight_scale") or value.ndim == 0 or name.startswith("decoder/projection/"):
            continue  # scales are applied below; scalars are flags; the projection is the embedding
        if value.dtype == np.int8:  # int8 weights: one scale per output channel, q = round(w * scale)
            scale = variables[name + "_scale"].reshape(-1, *[1] * (value.ndim - 1))
            value = (value.astype(np.float32) / scale).astype(np.float16)
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
    except KeyError as e:
        raise EdgeportError(f"{folder}/model.bin: not a Whisper model (no {e.args[0]})") from e
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
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
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

    return WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def _array(raw, dtype, shape: list[int], name: str, reader: "_Reader") -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the upper half of float32
        values = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        array = values.view(np.float32)
    else:
        array = np.frombuffer(raw, dtype)
    if array.size != int(np.prod(shape)):
        raise reader.error(f"{name} holds {array.size} values for shape {shape}")
    return array.reshape(shape).copy()


class _Reader:
    """Sequential reads from a memory-mapped file, each checked against its end."""

    def __init__(self, data, file: Path):
        self.data, self.file, self.at = data, file, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise self.error("truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        try:
            return raw.rstrip(b"\0").decode()
        except UnicodeDecodeError as e:
            raise self.error("a variable name is not text") from e

    def error(self, what: str) -> EdgeportError:
        return EdgeportError(f"{self.file}: not a valid CTranslate2 model ({what} at byte {self.at}); re-download it")


def _json(file: Path) -> dict:
    data = read_json(file, "a CTranslate2 model folder has config.json beside model.bin")
    if not isinstance(data, dict):
        raise EdgeportError(f"{file}: expected a JSON object")
    return data
