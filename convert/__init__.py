"""Converters, one module per format, each `convert(source, step, target, dest) -> Artifact`.

They are imported only when used, so a missing optional backend fails with the extra to install.
"""

import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeport.errors import EdgeportError

# format -> (module, the pip extra that brings its backend)
CONVERTERS = {
    "mlx": ("edgeport.convert.mlx", "mlx"),
    "coreml": ("edgeport.convert.coreml", "coreml"),
    "onnx": ("edgeport.convert.onnx", "onnx"),
    "ct2": ("edgeport.convert.ct2", "speech"),
}


@dataclass
class Artifact:
    format: str
    quantization: str
    path: Path  # the folder the converter wrote
    engine: str  # the library that made it, with its version
    details: dict = field(default_factory=dict)


def converter(fmt: str):
    """The converter module for `fmt`, or a clear error naming the extra its backend comes with."""
    if fmt not in CONVERTERS:
        raise EdgeportError(f"no converter for {fmt} in this version of edgeport (available: {', '.join(CONVERTERS)})")
    module, extra = CONVERTERS[fmt]
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
