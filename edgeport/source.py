"""Open a model source — a Hugging Face folder or hub id, a GGUF file, or a CTranslate2 Whisper folder — as a
`Source` in HF layout.

Weights are only ever read from safetensors (checked for truncation first), GGUF (read by the `gguf`
package through transformers) or CTranslate2's model.bin (parsed with bounds checks by `edgeport.ct2`).
Pickle checkpoints are refused unless the user passes --allow-pickle, and even then they are read with
`torch.load(weights_only=True)` and rewritten as safetensors once.
"""

import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from importlib.util import find_spec
from pathlib import Path

from edgeport import ct2
from edgeport.config import check as check_config
from edgeport.config import weights_hold
from edgeport.errors import EdgeportError
from edgeport.files import cache_dir, cache_entry, read_json
from edgeport.headers import check_gguf, check_safetensors, regular_file

# Causal LM architectures edgeport plans (transformers counts them from the config), converts to MLX (mlx-lm
# converts them) and checks (transformers runs them as the parity reference).
CAUSAL_LM_TYPES = (
    "deepseek_v2",
    "deepseek_v3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt_oss",
    "granite",
    "llama",
    "mistral",
    "mixtral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "smollm3",
)
# Those the Core ML and ONNX converters trace from transformers (the ones their tests and benchmarks exercise);
# the others are planned for every format and built as MLX.
TRACED_CAUSAL_LM_TYPES = (
    "gemma",
    "gemma2",
    "gemma3_text",
    "llama",
    "mistral",
    "mixtral",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
)
# Those the GGUF writer maps onto llama.cpp's architectures (edgeport.convert.gguf).
GGUF_CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")
WHISPER_TYPES = ("whisper",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"  # transformers' names
SAFETENSORS_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class SourceQuantization:
    """Weights that arrive already quantized: how, and how many bits a weight they are stored in (scales
    included). `dequantized`: edgeport turns them into float16 first (and each artifact's losses then add to
    theirs); otherwise it plans them but refuses to convert them."""

    method: str
    bits: float
    dequantized: bool

    def describe(self) -> str:
        return f"{self.method}, {self.bits:.2f} bits a weight"


# quantization_config methods whose weights only their own kernels unpack: transformers needs gptqmodel, autoawq,
# bitsandbytes, … to read them back as floats, and edgeport converts from floats.
DECLARED_BITS = {"fp8": 8, "mxfp4": 4.25, "bitsandbytes": None, "compressed-tensors": None}
METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "mxfp4": "MXFP4"}  # as their authors write them


def quantization_of(config: dict) -> SourceQuantization | None:
    """What a config says its weights are quantized to: mlx-lm's `quantization` (affine, a float16 scale and bias a
    group), or transformers' `quantization_config` (GPTQ, AWQ, FP8, MXFP4, …)."""
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and isinstance(mlx.get("bits"), int) and 1 <= mlx["bits"] <= 16:
        group = mlx.get("group_size") if _positive(mlx.get("group_size")) and isinstance(mlx["group_size"], int) else 64
        return SourceQuantization(f"MLX affine {mlx['bits']}-bit (group {group})", mlx["bits"] + 32 / group, True)
    declared = config.get("quantization_config")
    if not isinstance(declared, dict):
        return None
    method = str(declared.get("quant_method", "unknown"))[:40]
    bits, group = declared.get("bits"), declared.get("group_size")
    bits = bits if _positive(bits) and bits <= 16 else DECLARED_BITS.get(method)
    group = group if _positive(group) and isinstance(group, int) else 0  # GPTQ's -1: one scale per channel
    stored = (bits + (16 / group if group else 0)) if bits else 16.0
    return SourceQuantization(METHOD_NAMES.get(method, method), stored, False)


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@dataclass
class Source:
    """A model in Hugging Face layout, and where it came from."""

    ref: str  # what the user named
    kind: str  # "hf-folder" | "hf-hub" | "gguf" | "ct2"
    config: dict
    path: Path | None = None  # the HF-layout folder; None when opened for its config only
    revision: str | None = None
    origin_files: list[Path] = field(default_factory=list)  # the user's weight files, hashed in the manifest
    trust_remote_code: bool = False
    # Opened for its config only: the cache that opening it whole will write its weights into (a hub snapshot, a
    # GGUF's, an MLX-quantized folder's or CTranslate2 model's float16 copy), where they are not there yet.
    fills_cache: Path | None = None
    quantized: SourceQuantization | None = None  # weights that arrive already quantized

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def family(self):
        """The model family (edgeport.families) that plans, checks and benches this source."""
        from edgeport.families import family_of

        return family_of(self.model_type)

    @property
    def name(self) -> str:
        return source_name(self.ref)

    def local_paths(self) -> list[Path]:
        """The folders and files of the user's that this source reads: an output may not touch them."""
        return [p for p in (self.path, *self.origin_files, Path(self.ref).expanduser()) if p and p.exists()]

    def origin_sha256(self) -> dict[str, str]:
        return {f.name: sha256_file(f) for f in self.origin_files}

    def __getstate__(self) -> dict:
        """What a step process is given: the tokenizer read here is read there again when needed."""
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}

    @cached_property
    def tokenizer(self):
        """The source's tokenizer, read once (the pre-flight check and the parity reference share it)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except Exception as e:  # transformers and tokenizers report a bad tokenizer file in many types
            raise EdgeportError(f"{self.ref}: its tokenizer cannot be read ({type(e).__name__}: {str(e)[:160]})") from e

    def load_reference(self, **options):
        """The source model in transformers on the CPU in float32 (the parity reference) or the `dtype` given.
        `options` go to `from_pretrained` (e.g. attn_implementation)."""
        import torch
        import transformers
        from transformers.utils import logging

        logging.disable_progress_bar()  # edgeport's own spinner reports the step
        model = getattr(transformers, self.family.auto_model).from_pretrained(
            self.path,
            **{"dtype": torch.float32, **options},
            use_safetensors=True,
            trust_remote_code=self.trust_remote_code,
        )
        return model.eval()


def source_name(ref: str) -> str:
    """The model's short name: its folder or file name without extensions, or the name part of a hub id."""
    path = Path(ref).expanduser()
    name = path.resolve().name if path.exists() else Path(ref.rstrip("/")).name
    return name.split(".")[0] if name.endswith(".gguf") else name


def open_source(
    ref: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    config_only: bool = False,
) -> Source:
    """Open `ref` (folder, .gguf file or hub id). With `config_only`, read nothing but the config."""
    path = Path(ref).expanduser()
    if not config_only or path.suffix == ".gguf" or (path.is_dir() and ct2.is_ct2_whisper(path)):
        _require_convert_extra(ref)
    if path.is_file() and path.suffix == ".gguf":
        source = _open_gguf(path, config_only)
    elif path.is_dir() and ct2.is_ct2_whisper(path):
        source = _open_ct2(path, config_only)
    elif path.is_dir():
        source = _open_folder(path, allow_pickle, config_only)
    elif path.exists():
        raise EdgeportError(f"{ref}: not a model folder or a .gguf file")
    elif HUB_ID.match(ref) and not ref.startswith((".", "/")):
        source = _open_hub(ref, revision, allow_pickle, config_only)
    else:
        raise EdgeportError(f"{ref}: no such file or folder (give a model folder, a .gguf file or a hub id org/name)")
    source.trust_remote_code = trust_remote_code
    return source


def _require_convert_extra(ref: str) -> None:
    """Reading weights, GGUF metadata or a CTranslate2 tokenizer takes the libraries of the convert extra."""
    missing = [name for name in ("torch", "transformers", "gguf", "safetensors") if find_spec(name) is None]
    if missing:
        raise EdgeportError(f"{ref}: reading it needs {', '.join(missing)}: pip install 'edgeport[convert]'")


def _open_folder(folder: Path, allow_pickle: bool, config_only: bool, kind: str = "hf-folder") -> Source:
    config = read_config(folder)
    quantized = quantization_of(config)
    source = Source(ref=str(folder), kind=kind, config=config, path=folder, quantized=quantized)
    if config_only:
        # not hashed yet (that reads every weight): a dequantized copy of a folder of this name counts as this one's
        if quantized and quantized.dequantized and not any((cache_dir() / "mlx").glob(f"{folder.name}-*")):
            source.fills_cache = cache_dir()
        return source
    _refuse_links_out(folder)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        weights_hold(config, sum(check_safetensors(f) for f in safetensors), folder / "config.json")
        _check_index(folder / SAFETENSORS_INDEX, {f.name for f in safetensors})
        source.origin_files = safetensors
        if quantized:
            refuse_quantized(source)
            source.path = _mlx_to_hf(folder)
            source.config = read_config(source.path)
        return source
    pickles = _pickle_weights(folder)
    if not pickles:
        raise EdgeportError(f"{folder}: no weights found (expected *.safetensors next to config.json)")
    if not allow_pickle:
        raise EdgeportError(
            f"{folder}: only pickle weights ({pickles[0].name}); pickle can run code when loaded, so it is "
            "refused. Convert it to safetensors, or pass --allow-pickle if you trust its author"
        )
    source.origin_files = [regular_file(f) for f in pickles]
    source.path = _pickle_to_safetensors(folder, pickles)
    return source


def refuse_quantized(source: Source) -> None:
    """A source quantized in a way only its own kernels unpack is planned, never converted."""
    if source.quantized and not source.quantized.dequantized:
        raise EdgeportError(
            f"{source.ref}: its weights are {source.quantized.describe()}, which only that method's own kernels "
            "unpack; edgeport converts from float weights, so convert the float checkpoint it was made from "
            "(`edgeport plan` still plans it)"
        )


def _dequantized_folder(folder: Path) -> Path:
    files = "".join(sha256_file(f) for f in sorted(folder.glob("*.safetensors")))
    return cache_dir() / "mlx" / f"{folder.name}-{hashlib.sha256(files.encode()).hexdigest()[:16]}-fp16"


def _mlx_to_hf(folder: Path) -> Path:
    """An MLX-quantized folder dequantized once, by mlx-lm, to float16 safetensors in the cache (mlx-lm keeps
    transformers' weight names)."""
    cached = _dequantized_folder(folder)
    if (cached / "config.json").exists():
        return cached
    import contextlib
    import io

    import mlx_lm

    with cache_entry(cached) as staging, contextlib.redirect_stdout(io.StringIO()):
        staging.rmdir()  # mlx-lm writes a folder of its own
        try:
            mlx_lm.convert(str(folder), str(staging), dequantize=True, dtype="float16")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeportError(f"{folder}: mlx-lm could not dequantize it ({type(e).__name__}: {e})") from e
    return cached


def _refuse_links_out(folder: Path) -> None:
    """Tokenizer files, templates and configs are copied into every output an app ships: one that links outside
    the model (tokenizer.json -> ~/.ssh/id_rsa) must not carry that file along. Weights are converted, not copied,
    and links into the Hugging Face cache are how its snapshots are laid out."""
    from huggingface_hub.constants import HF_HUB_CACHE

    allowed = (folder.resolve(), Path(HF_HUB_CACHE).resolve())
    for file in folder.iterdir():
        if file.is_symlink() and file.suffix != ".safetensors":
            real = file.resolve()
            if not any(real.is_relative_to(place) for place in allowed):
                raise EdgeportError(
                    f"{file}: links to {real}, outside the model folder, and would be copied into the output; "
                    "put the file itself in the folder"
                )


def _pickle_weights(folder: Path) -> list[Path]:
    """The pickle files the checkpoint names as its weights (never training_args.bin and the like)."""
    if (folder / PICKLE_INDEX).exists():
        return [folder / name for name in _check_index(folder / PICKLE_INDEX, None)]
    return [folder / PICKLE_WEIGHTS] if (folder / PICKLE_WEIGHTS).exists() else []


def _check_index(index: Path, present: set[str] | None) -> list[str]:
    """The shard names a weight index lists: plain names of files in its folder (and among `present`)."""
    if not index.exists():
        return []
    data = read_json(index, "")
    shards = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(shards, dict) or not all(isinstance(n, str) for n in shards.values()):
        raise EdgeportError(f"{index}: weight_map must map tensor names to file names")
    names = sorted(set(shards.values()))
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise EdgeportError(f"{index}: the shard '{name[:80]}' is not a file name in the model folder")
        if not (index.parent / name).is_file() or (present is not None and name not in present):
            raise EdgeportError(f"{index}: lists the shard {name}, which is not in the folder")
    return names


def _open_hub(repo_id: str, revision: str | None, allow_pickle: bool, config_only: bool) -> Source:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if config_only:
            from huggingface_hub.constants import HF_HUB_CACHE

            config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision))
            fetched = any(config_file.parent.glob("*.safetensors"))
            config = read_config(config_file.parent)
            return Source(
                ref=repo_id,
                kind="hf-hub",
                config=config,
                fills_cache=None if fetched else Path(HF_HUB_CACHE),
                quantized=quantization_of(config),
            )
        patterns = HUB_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except EdgeportError:
        raise
    except Exception as e:  # huggingface_hub's errors, and the network's underneath them
        raise EdgeportError(f"{repo_id}: {_hub_problem(e, revision)}") from e
    source = _open_folder(folder, allow_pickle, config_only=False, kind="hf-hub")
    source.ref, source.revision = repo_id, folder.name  # the snapshot folder is named by its commit
    return source


def _hub_problem(error: Exception, revision: str | None) -> str:
    """What went wrong getting a model from the Hub, and what to do, in words."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return "is gated: accept its terms on its Hub page, then log in with `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return "no such model on the Hugging Face Hub, or it is private (log in with `hf auth login`)"
    if isinstance(error, RevisionNotFoundError):
        return f"has no revision '{revision}'"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return (
            "is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the network off: unset it to "
            "download the model, or pass a local folder"
        )
    return (
        f"could not be downloaded ({type(error).__name__}): is the network off? With the model already in the "
        "cache, HF_HUB_OFFLINE=1 works from the cache alone"
    )


def _open_gguf(file: Path, config_only: bool) -> Source:
    weights = check_gguf(file)
    values = weights.values
    quantized = SourceQuantization(f"{weights.main_type} GGUF", weights.bits, True) if weights.bits < 15 else None
    folder = cache_dir() / "gguf" / f"{file.stem}-{sha256_file(file)[:16]}-fp16"
    # Reading a GGUF's config through transformers takes seconds; the converted folder has it at hand.
    config = read_config(folder) if (folder / "config.json").exists() else _gguf_config(file)
    weights_hold(config, values, file)
    converted = (folder / "config.json").exists()
    if not config_only and not converted:
        _gguf_to_hf(file, folder)
    if config_only:
        return Source(
            ref=str(file),
            kind="gguf",
            config=config,
            origin_files=[file],
            fills_cache=None if converted else cache_dir(),
            quantized=quantized,
        )
    return Source(ref=str(file), kind="gguf", config=config, path=folder, origin_files=[file], quantized=quantized)


def _open_ct2(folder: Path, config_only: bool) -> Source:
    """A CTranslate2 Whisper folder, rewritten once into HF layout in the cache (seconds: it holds no code). With
    `config_only`, only model.bin's header is read."""
    weights, tokenizer = folder / "model.bin", folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise EdgeportError(f"{folder}: no tokenizer.json beside model.bin (faster-whisper folders carry one)")
    if config_only:  # not hashed yet: a copy of a folder of this name counts as this one's
        converted = any((copy / "config.json").exists() for copy in (cache_dir() / "ct2").glob(f"{folder.name}-*"))
        return Source(
            ref=str(folder),
            kind="ct2",
            config=ct2.hf_config(folder),
            origin_files=[weights],
            fills_cache=None if converted else cache_dir(),
        )
    files = "".join(sha256_file(f) for f in (weights, tokenizer, folder / "config.json"))
    hf_folder = cache_dir() / "ct2" / f"{folder.name}-{hashlib.sha256(files.encode()).hexdigest()[:16]}"
    if not (hf_folder / "config.json").exists():
        with cache_entry(hf_folder) as staging:
            ct2.to_hf(folder, staging)
    return Source(ref=str(folder), kind="ct2", config=read_config(hf_folder), path=hf_folder, origin_files=[weights])


def _gguf_config(file: Path) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:  # the header is bounds-checked already: this is what the values mean to transformers
        raise EdgeportError(f"{file}: cannot read this GGUF file ({type(e).__name__}: {str(e)[:200]})") from e
    return _checked(with_rope_theta(config.to_dict()), file)


def _gguf_to_hf(file: Path, folder: Path) -> None:
    """Dequantize a GGUF model to float16 safetensors in HF layout at `folder`, the cache later runs reuse."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with cache_entry(folder) as staging:
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float16)
        except Exception as e:  # as in _gguf_config
            raise EdgeportError(f"{file}: cannot load this GGUF model ({type(e).__name__}: {str(e)[:200]})") from e
        # transformers refuses to save a model loaded from GGUF, so its weights move into a fresh one.
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float16)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config = with_rope_theta(read_config(staging))
        config.pop("quantization_config", None)  # the weights are float16 now; other tools would take them as GGUF
        (staging / "config.json").write_text(json.dumps(config, indent=2))


def with_rope_theta(config: dict) -> dict:
    """transformers 5 writes rope_parameters; mlx-lm and older readers want a top-level rope_theta."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config = {**config, "rope_theta": rope["rope_theta"]}
    return config


def _pickle_to_safetensors(folder: Path, pickles: list[Path]) -> Path:
    """Rewrite trusted pickle weights as safetensors beside a copy of the folder's other files."""
    import torch
    from safetensors.torch import save_file

    digest = hashlib.sha256("".join(sha256_file(f) for f in pickles).encode()).hexdigest()[:16]
    out = cache_dir() / "pickle" / f"{folder.name}-{digest}"
    if (out / "model.safetensors").exists():
        return out
    with cache_entry(out) as staging:
        tensors = {}
        for f in pickles:
            try:  # torch's weights-only unpickler: tensors and plain containers, never a callable
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise EdgeportError(
                    f"{f}: refused by torch's weights-only loader ({type(e).__name__}); it may hold code, or be no "
                    "checkpoint at all"
                ) from e
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise EdgeportError(f"{f}: not a state dict of named tensors")
            tensors.update({k: v.contiguous().clone() for k, v in state.items()})
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        for f in folder.iterdir():
            if f.is_file() and f.suffix not in PICKLE_SUFFIXES and not f.name.endswith(".index.json"):
                shutil.copy2(f, staging / f.name)
    return out


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    return _checked(read_json(file, "is this a Hugging Face model folder?"), file)


def _checked(config, where: Path) -> dict:
    """A config whose fields are sound (`edgeport.config`) and whose architecture edgeport handles."""
    config = check_config(config, where)
    model_type = config["model_type"]
    if model_type not in CAUSAL_LM_TYPES + WHISPER_TYPES:
        supported = ", ".join(CAUSAL_LM_TYPES + WHISPER_TYPES)
        raise EdgeportError(f"{where}: architecture '{model_type}' is not supported; supported: {supported}")
    return config


def sha256_file(file: Path) -> str:
    """The file's sha256, computed once per path, size and modification time (regular files only)."""
    stat = regular_file(file).stat()
    return _sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()
