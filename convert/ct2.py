"""Whisper -> CTranslate2, the format faster-whisper runs on Linux and Windows CPUs, through CTranslate2's own
Transformers converter."""

import json
from pathlib import Path

import ctranslate2
from ctranslate2.converters import TransformersConverter
from transformers.utils import logging

from edgeport import quantization
from edgeport.convert import Artifact
from edgeport.errors import EdgeportError
from edgeport.layouts import CT2Whisper
from edgeport.plan import Step
from edgeport.source import Source
from edgeport.targets import Target

QUANTIZATION = {"int8": "int8", "fp16": "float16"}  # edgeport's name -> CTranslate2's
FILES = ("tokenizer.json", "preprocessor_config.json")  # what faster-whisper reads beside model.bin


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as a CTranslate2 model folder at `dest` (which must not exist), loadable by
    `faster_whisper.WhisperModel(dest)`."""
    quant = quantization.get(step.quantization, "ct2")
    logging.disable_progress_bar()  # the converter loads the model through transformers; our spinner reports it
    files = [name for name in FILES if (source.path / name).exists()]  # names, which it finds in the model folder
    try:
        TransformersConverter(str(source.path), copy_files=files, low_cpu_mem_usage=True).convert(
            str(dest), quantization=QUANTIZATION[quant.name]
        )
    except (ValueError, KeyError, OSError) as e:
        raise EdgeportError(f"{source.ref}: CTranslate2 could not convert it ({e})") from e
    _fill_lang_ids(dest, source.path)
    engine = f"ctranslate2 {ctranslate2.__version__}"
    return Artifact("ct2", quant.name, dest, engine, CT2Whisper(), {"weights": QUANTIZATION[quant.name]})


def _fill_lang_ids(dest: Path, model_folder: Path) -> None:
    """Under transformers 5 the converter finds no language tokens and writes empty lang_ids, which breaks
    faster-whisper's language detection on multilingual models: take them from the tokenizer."""
    config_file = dest / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("lang_ids"):
        return
    from transformers import AutoTokenizer

    # Whisper's language tokens lie between <|startoftranscript|> and <|translate|>.
    first, last = AutoTokenizer.from_pretrained(model_folder).convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|translate|>"]
    )
    config["lang_ids"] = list(range(first + 1, last))
    config_file.write_text(json.dumps(config, indent=2))
