"""Converters, one module per (family, format), each `convert(source, step, target, dest) -> Artifact`: it writes
the artifact's folder and returns its typed layout with it. A converter reads the source and the plan's step, never
the manifest or the runtime.

They are imported only when used, so a missing optional backend fails with the extra to install.
"""

import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeport.errors import EdgeportError
from edgeport.layouts import Layout

# (family, format) -> (module, the pip extra that brings its backend)
CONVERTERS = {
    ("causal-lm", "mlx"): ("edgeport.convert.mlx", "mlx"),
    ("causal-lm", "coreml"): ("edgeport.convert.coreml", "coreml"),
    ("causal-lm", "onnx"): ("edgeport.convert.onnx", "onnx"),
    ("causal-lm", "gguf"): ("edgeport.convert.gguf", "gguf"),
    ("whisper", "mlx"): ("edgeport.convert.whisper_mlx", "mlx"),
    ("whisper", "coreml"): ("edgeport.convert.whisper_coreml", "coreml"),
    ("whisper", "onnx"): ("edgeport.convert.whisper_onnx", "onnx"),
    ("whisper", "ct2"): ("edgeport.convert.ct2", "speech"),
}


@dataclass
class Artifact:
    format: str
    quantization: str
    path: Path  # the folder the converter wrote
    engine: str  # the library that made it, with its version
    layout: Layout  # what the folder holds, as its runner reads it
    details: dict = field(default_factory=dict)


# The library each extra brings that its converters cannot start without: a format whose library is missing is listed
# as not built, with the install line, and the others are built.
BACKENDS = {
    "mlx": "mlx_lm",
    "coreml": "coremltools",
    "onnx": "onnxruntime_genai",
    "gguf": "llama_cpp",
    "speech": "ctranslate2",
}


def missing_backend(family: str, fmt: str) -> str | None:
    """Why the converter for `fmt` of `family` cannot run here, or None."""
    from edgeport.engines import missing

    _, extra = CONVERTERS[family, fmt]
    return missing(BACKENDS[extra], extra)


def converter(family: str, fmt: str):
    """The converter module for `fmt` of `family`, or a clear error naming the extra its backend comes with."""
    if (family, fmt) not in CONVERTERS:
        have = ", ".join(f for fam, f in CONVERTERS if fam == family)
        raise EdgeportError(f"no {family} converter for {fmt} in this version of edgeport (available: {have})")
    module, extra = CONVERTERS[family, fmt]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgeportError(
            f"the {fmt} converter needs its backend ({e.name} is missing): pip install 'edgeport[{extra}]'"
        ) from e


# What an app needs beside the model to turn text (or speech) into tokens and back, and to generate as the
# author meant.
APP_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
    "preprocessor_config.json",  # Whisper's log-mel feature extractor
)


def copy_app_files(model_folder: Path, dest: Path) -> None:
    """Copy the source's tokenizer, chat template, generation settings and config beside an artifact."""
    for name in APP_FILES:
        if (model_folder / name).exists():
            shutil.copy2(model_folder / name, dest / name)
