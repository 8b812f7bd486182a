"""How each library runs an artifact, one module per engine, imported by the converters (calibration, weights read
back) and the runtime alike: `reference` (the source in transformers), `onnx`, `mlx`, `coreml`, `ct2`, and
`whisper`, the speech loop every Whisper engine shares. `loop` holds what the loops share: streamed tokens and
their clock, and the two attention-mask conventions of the static graphs.

Each engine module says once whether it can run here: `unavailable_here() -> reason | None`, and opens a
layout for the bench (`runner(layout, folder)`) or for parity (`parity_runner(layout, folder, quantized,
source) -> (runner, what this platform leaves unchecked)`)."""

import importlib
import importlib.util

from edgeport.layouts import Layout


def engine_of(layout: Layout):
    """The engine module that runs `layout`: `engine_of(layout).runner(layout, folder)` for the bench,
    `.parity_runner(layout, folder, quantized, source)` for parity."""
    return importlib.import_module(f"edgeport.engines.{layout.engine}")


def missing(package: str, extra: str) -> str | None:
    """Why an engine cannot run here when the library it drives is not installed, or None when it is."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed: pip install 'edgeport[{extra}]'"
    return None
