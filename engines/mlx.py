"""MLX artifacts: causal LMs through mlx-lm, Whisper in mlx-whisper's own model. On a Mac MLX runs on Metal; off
one, on its CPU backend, which multiplies matrices some 70 times slower than torch (2 GFLOPS against 150 on this
2-core Xeon) and has no fast float16 or bfloat16 arithmetic: a 4-bit model runs 40 times faster with float32
activations, so off a Mac the bench runs it so. Off a Mac, parity of a quantized causal LM, and of Whisper (whose
encoder would take minutes per 30 s window), therefore runs the artifact's weights, dequantized, in the source's
architecture in transformers (paged like the reference); a float causal LM runs in MLX itself, in its own dtype."""

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeport.engines import missing
from edgeport.engines.loop import Token
from edgeport.engines.whisper import WhisperRunner
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout, MLXModel
from edgeport.layouts import MLXWhisper as MLXWhisperLayout
from edgeport.machine import ON_MAC

NO_METAL = "MLX on Metal"  # what off a Mac is left unchecked
DEQUANTIZE_ROWS = 4096


def unavailable_here() -> str | None:
    return missing("mlx_lm", "mlx")


def runner(layout: Layout, folder: Path):
    return MLXRunner(folder, float32=not ON_MAC) if isinstance(layout, MLXModel) else MLXWhisper(folder)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    if ON_MAC:
        return runner(layout, folder), None
    if isinstance(layout, MLXWhisperLayout):  # a large encoder takes MLX's CPU build minutes per 30 s window
        return _whisper_in_transformers(source, folder, quantized), (
            "mlx-whisper's model and MLX's kernels (MLX's CPU build multiplies matrices at a few GFLOPS: off a Mac the "
            "artifact's weights were read back, dequantized, and run in the source's architecture in transformers, "
            "float32)"
        )
    if not quantized:  # a float artifact runs in MLX: its own dtype, overflow and all
        return MLXRunner(folder), f"{NO_METAL} (measured on MLX's CPU backend)"
    weights = _in_transformers(source, folder)
    if weights:
        return weights, (
            "mlx-lm's model and MLX's quantized kernels (MLX's CPU build multiplies matrices at a few GFLOPS: off "
            "a Mac the artifact's weights were read back, dequantized, and run in the source's architecture in "
            "transformers, float32)"
        )
    return MLXRunner(folder, dequantize=True), (
        "MLX quantized kernels (off a Mac they take minutes per pass: the quantized weights were "
        "measured dequantized to float32 on MLX's CPU backend)"
    )


def _whisper_in_transformers(source, folder: Path, quantized: bool):
    """Whisper's architecture in transformers with the mlx-whisper artifact's weights, the encoder paged as the
    reference pages it."""
    from edgeport.engines.reference import TorchWhisper, paged

    model = paged(source, lambda block: block.startswith("model.encoder.layers."), MLXWhisperCheckpoint(folder))
    if model is None:
        raise EdgeportError(f"{folder}: its weights do not map back onto {source.ref}'s architecture")
    runner = TorchWhisper(source, model)
    runner.engine += " with the MLX artifact's weights" + (", dequantized" if quantized else "")
    return runner


def _in_transformers(source, folder: Path):
    """The source's architecture in transformers, paged, with the MLX artifact's weights; None where mlx-lm stored
    them under other names or shapes (stacked MoE experts)."""
    from edgeport.engines.reference import TorchRunner, paged

    model = paged(source, lambda block: True, MLXCheckpoint(folder))
    if model is None:
        return None
    runner = TorchRunner(source, model)
    runner.engine += " with the MLX artifact's weights, dequantized"
    return runner


class MLXCheckpoint:
    """An MLX folder's weights as a paged reference reads them: quantized ones dequantized in their scales' dtype
    (as mlx-lm's `dequantize_model` does), every one widened to float32. Each read loads what it needs afresh (MLX
    loads lazily: an array keeps its data once computed, so arrays held here would end up the whole artifact)."""

    def __init__(self, folder: Path):
        import json

        import mlx.core as mx

        self.mx = mx
        mx.set_cache_limit(0)  # a freed buffer goes back to the system, not to MLX's cache
        self.quantization = json.loads((folder / "config.json").read_text()).get("quantization") or {}
        self.files = {}
        for file in sorted(folder.glob("*.safetensors")):
            self.files.update(dict.fromkeys(mx.load(str(file)), file))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, rows: slice | None = None):
        """The tensor `name` in float32 (dequantized), or only `rows` of its first dimension."""
        import torch

        mx, layer = self.mx, name.removesuffix(".weight")
        weight = self._array(name)
        start, stop, _ = (rows or slice(None)).indices(weight.shape[0])
        if f"{layer}.scales" not in self.files:
            widened = weight[start:stop].astype(mx.float32)
            mx.eval(widened)
            return torch.from_numpy(np.asarray(memoryview(widened)))
        settings = self.quantization.get(layer)  # mixed recipes give some layers their own bits
        settings = settings if isinstance(settings, dict) else self.quantization
        scales = self._array(f"{layer}.scales")
        biases = self._array(f"{layer}.biases") if f"{layer}.biases" in self.files else None
        out = torch.empty((stop - start, scales.shape[1] * settings["group_size"]), dtype=torch.float32)
        for first in range(start, stop, DEQUANTIZE_ROWS):  # a slice at a time: one float32 copy in all
            part_rows = slice(first, min(first + DEQUANTIZE_ROWS, stop))
            part = mx.dequantize(
                weight[part_rows],
                scales=scales[part_rows],
                biases=None if biases is None else biases[part_rows],
                group_size=settings["group_size"],
                bits=settings["bits"],
                mode=settings.get("mode", "affine"),
            ).astype(mx.float32)
            mx.eval(part)
            out[first - start : part_rows.stop - start] = torch.from_numpy(np.asarray(memoryview(part)))
        return out

    def _array(self, name: str):
        return self.mx.load(str(self.files[name]))[name]  # lazy: read when computed, let go with the array


class MLXWhisperCheckpoint(MLXCheckpoint):
    """An mlx-whisper folder's weights under the transformers names they were converted from; the encoder's
    positions, which mlx-whisper computes rather than stores, computed as it does."""

    def __init__(self, folder: Path):
        import json

        super().__init__(folder)
        dims = json.loads((folder / "config.json").read_text())
        self.positions = (dims["n_audio_ctx"], dims["n_audio_state"])

    def __contains__(self, name: str) -> bool:
        return name == MLXWhisperLayout.ENCODER_POSITIONS or MLXWhisperLayout.weight_name(name) in self.files

    def read(self, name: str, rows: slice | None = None):
        import torch
        from mlx_whisper.whisper import sinusoids

        if name == MLXWhisperLayout.ENCODER_POSITIONS:
            return torch.from_numpy(np.asarray(sinusoids(*self.positions).astype(self.mx.float32)))[rows or slice(None)]
        value = super().read(MLXWhisperLayout.weight_name(name), rows)
        if name.startswith("model.encoder.conv") and name.endswith(".weight"):
            value = value.permute(0, 2, 1).contiguous()  # MLX's [out, kernel, in] -> torch's [out, in, kernel]
        return value


class MLXRunner:
    """A causal LM through mlx-lm."""

    def __init__(self, path: Path, dequantize: bool = False, float32: bool = False):
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
            dequantize_when_used(self.model)
            self.engine += ", weights dequantized to float32"
        elif float32:  # the quantized weights as stored; their scales, the norms and the activations in float32
            self.model.set_dtype(mx.float32)
            self.engine += ", float32 activations"

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

    def __init__(self, path: Path):
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
        if on_cpu:
            self.model.set_dtype(mx.float32)  # MLX's CPU backend has no fast float16 matmul

    def encode(self, mel: np.ndarray):
        return self.model.encoder(self.mx.array(mel.transpose(0, 2, 1)))  # MLX convolutions take [batch, time, mels]

    def begin(self, encoded) -> None:
        self.audio, self.cache = encoded, None

    def step(self, tokens: list[int]) -> np.ndarray:
        logits, self.cache, _ = self.model.decoder(self.mx.array([tokens]), self.audio, kv_cache=self.cache)
        return np.array(logits[0, -1].astype(self.mx.float32))


def dequantize_when_used(model) -> None:
    """Run `model`'s quantized layers in float32, each weight dequantized when its layer runs and let go after: the
    model holds its quantized weights only (a float32 copy of all of them is 8 times a 4-bit model). The values are
    those of mlx-lm's `dequantize_model`: dequantized in the scales' own dtype, then widened."""
    import mlx.core as mx
    import mlx.nn as nn

    def weight(layer, rows=None):
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        biases = layer.get("biases")
        return mx.dequantize(
            pick(layer["weight"]),
            scales=pick(layer["scales"]).astype(layer.scale_dtype),
            biases=None if biases is None else pick(biases).astype(layer.scale_dtype),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        ).astype(mx.float32)

    class Linear(nn.QuantizedLinear):
        def __call__(self, x):
            x = x @ weight(self).T
            return x + self["bias"] if "bias" in self else x

    class Embedding(nn.QuantizedEmbedding):
        def __call__(self, x):
            return weight(self, rows=x)

        def as_linear(self, x):
            return x @ weight(self).T

    for _, layer in model.named_modules():
        kind = {nn.QuantizedLinear: Linear, nn.QuantizedEmbedding: Embedding}.get(type(layer))
        if kind:
            layer.scale_dtype, layer.__class__ = layer["scales"].dtype, kind
    model.set_dtype(mx.float32)


def slow_here() -> str | None:
    """Why MLX cannot run at its speed here (off a Mac it runs on its CPU build), or None on a Mac."""
    return None if ON_MAC else "MLX's CPU build off a Mac (float32 activations, a few tokens/s at best)"
