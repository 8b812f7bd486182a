"""MLX artifacts: causal LMs through mlx-lm, Whisper in mlx-whisper's own model. On a Mac MLX runs on Metal; off
one, on its CPU backend, where quantized matmuls take minutes a pass: parity then measures the same quantized
weights dequantized to float32."""

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeport.engines import missing
from edgeport.engines.loop import Token
from edgeport.engines.whisper import WhisperRunner
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout, MLXModel
from edgeport.machine import ON_MAC

NO_METAL = "MLX on Metal"  # what off a Mac is left unchecked


def unavailable_here() -> str | None:
    return missing("mlx_lm", "mlx")


def runner(layout: Layout, folder: Path):
    return MLXRunner(folder) if isinstance(layout, MLXModel) else MLXWhisper(folder)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    kind = MLXRunner if isinstance(layout, MLXModel) else MLXWhisper
    if ON_MAC:
        return kind(folder), None
    if quantized:
        return kind(folder, dequantize=True), (
            "MLX quantized kernels (off a Mac they take minutes per pass: the quantized weights were "
            "measured dequantized to float32 on MLX's CPU backend)"
        )
    return kind(folder), f"{NO_METAL} (measured on MLX's CPU backend)"


class MLXRunner:
    """A causal LM through mlx-lm."""

    def __init__(self, path: Path, dequantize: bool = False):
        reason = unavailable_here()
        if reason:
            raise EdgeportError(reason)
        import mlx.core as mx
        import mlx_lm

        self.mx, self.mlx_lm = mx, mlx_lm
        self.model, self.tokenizer = mlx_lm.load(str(path))
        self.engine = f"mlx-lm {mlx_lm.__version__} ({mx.default_device()})"
        if dequantize:
            # Same weight values as the quantized model, computed in float32: what quantization did to
            # the weights, without MLX's CPU quantized kernels (minutes per forward pass on Linux).
            from mlx_lm.utils import dequantize_model

            self.model = dequantize_model(self.model)
            self.model.set_dtype(mx.float32)
            self.engine += ", weights dequantized to float32"

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self.model(self.mx.array([ids]))[0].astype(self.mx.float32)
        return np.array(out)

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        from mlx_lm.sample_utils import make_sampler

        self.mx.reset_peak_memory()
        start = time.perf_counter()
        for r in self.mlx_lm.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
        ):
            yield Token(
                r.text,
                r.token,
                time.perf_counter() - start,
                r.prompt_tokens,
                r.prompt_tps,
                r.generation_tokens,
                r.generation_tps,
                r.peak_memory,
            )


class MLXWhisper(WhisperRunner):
    """Whisper in mlx-whisper's own model: its encoder once per window, its decoder per step with its KV cache."""

    def __init__(self, path: Path, dequantize: bool = False):
        import json
        from importlib.metadata import version

        import mlx.core as mx
        from mlx_whisper.load_models import load_model

        layout = json.loads((path / "config.json").read_text())
        generation = path / "generation_config.json"
        decoding = json.loads(generation.read_text()) if generation.exists() else {}
        super().__init__(path, config={"vocab_size": layout["n_vocab"], **decoding})
        self.mx = mx
        on_cpu = mx.default_device() == mx.cpu
        self.model = load_model(str(path), dtype=mx.float32 if on_cpu else mx.float16)
        self.engine = f"mlx-whisper {version('mlx-whisper')} ({mx.default_device()})"
        if dequantize:  # what quantization did to the weights, without MLX's slow CPU quantized kernels
            from mlx_lm.utils import dequantize_model

            self.model = dequantize_model(self.model)
            self.engine += ", weights dequantized"
        if on_cpu:
            self.model.set_dtype(mx.float32)  # MLX's CPU backend has no fast float16 matmul

    def encode(self, mel: np.ndarray):
        return self.model.encoder(self.mx.array(mel.transpose(0, 2, 1)))  # MLX convolutions take [batch, time, mels]

    def begin(self, encoded) -> None:
        self.audio, self.cache = encoded, None

    def step(self, tokens: list[int]) -> np.ndarray:
        logits, self.cache, _ = self.model.decoder(self.mx.array([tokens]), self.audio, kv_cache=self.cache)
        return np.array(logits[0, -1].astype(self.mx.float32))


def slow_here() -> str | None:
    """Why MLX cannot run at its speed here (off a Mac it runs on its CPU build), or None on a Mac."""
    return None if ON_MAC else "MLX's CPU build off a Mac (quantized matmuls at well under 1 token/s)"
