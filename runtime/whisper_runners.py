"""One Whisper runner per engine, all driven by `transcribe`'s loop: transformers (the source), ONNX Runtime,
MLX (mlx-whisper's model), CTranslate2 and Core ML (macOS only)."""

import json
import logging
import sys
from pathlib import Path

import numpy as np

from edgeport.errors import EdgeportError
from edgeport.runtime.runners import COREML_NEEDS_MACOS, QNN, QNN_ABSENT, load_package_weights, onnx_providers
from edgeport.runtime.transcribe import WhisperRunner


class TorchWhisper(WhisperRunner):
    """The source in transformers on the CPU, float32: the parity reference."""

    def __init__(self, source, model=None):
        import torch
        import transformers

        super().__init__(source.path)
        self.torch = torch
        self.model = model or source.load_reference()
        self.engine = f"transformers {transformers.__version__} (torch, CPU, float32)"

    def encode(self, mel: np.ndarray):
        with self.torch.no_grad():
            return self.model.model.encoder(self.torch.from_numpy(mel)).last_hidden_state

    def begin(self, encoded) -> None:
        self.encoded, self.cache = encoded, None

    def step(self, tokens: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(
                encoder_outputs=(self.encoded,),
                decoder_input_ids=self.torch.tensor([tokens]),
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return out.logits[0, -1].float().numpy()


class WhisperONNXRunner(WhisperRunner):
    """The ONNX artifact: `encoder.onnx` once per window, then `decoder.onnx` per step over the KV cache this
    loop keeps. The NPU shape is fed one token at a time over its fixed cache, with QNN's EP where
    onnxruntime-qnn provides one."""

    def __init__(self, path: Path, npu: bool = False):
        import onnxruntime as ort

        super().__init__(path)
        self.shape = json.loads((path / "whisper.json").read_text())
        providers = onnx_providers(npu)
        self.encoder = ort.InferenceSession(str(path / "encoder.onnx"), providers=providers)
        self.decoder = ort.InferenceSession(str(path / "decoder.onnx"), providers=providers)
        self.providers = self.decoder.get_providers()
        self.engine = f"onnxruntime {ort.__version__} ({self.providers[0]})"
        self.record = None  # calibration: told (graph, a function making a copy of its feeds) of every call

    def encode(self, mel: np.ndarray):
        feeds = {"input_features": mel}
        if self.record:
            self.record("encoder", lambda: feeds)
        return self.encoder.run(None, feeds)

    def begin(self, encoded) -> None:
        self.cross_key, self.cross_value = encoded
        s = self.shape
        length = s["decoder_cache"] or 0
        self.cache = np.zeros((2, s["layers"], 1, s["heads"], length, s["head_dim"]), np.float32)
        self.filled = 0

    def step(self, tokens: list[int]) -> np.ndarray:
        if not self.shape["static"]:
            return self._call(tokens)[-1]
        for token in tokens:
            logits = self._call([token])
        return logits[-1]

    def _call(self, tokens: list[int]) -> np.ndarray:
        n, width = self.filled, len(tokens)
        static = self.shape["static"]
        if static:
            if n >= self.shape["decoder_cache"]:
                raise EdgeportError(f"the decoder's static cache holds {self.shape['decoder_cache']} tokens")
            mask = np.full((1, 1, 1, self.cache.shape[4] + 1), self.shape["mask_value"], np.float32)
            mask[..., :n] = 0
            mask[..., -1] = 0  # the token itself
        else:
            mask = np.zeros((1, 1, width, n + width), np.float32)
            mask[0, 0, :, n:] = np.triu(np.full((width, width), self.shape["mask_value"], np.float32), 1)
        feeds = {
            "input_ids": np.array([tokens], np.int32),
            "position_ids": np.arange(n, n + width, dtype=np.int32)[None],
            "attention_mask": mask,
            "past_key": self.cache[0],
            "past_value": self.cache[1],
            "cross_key": self.cross_key,
            "cross_value": self.cross_value,
        }
        if self.record:
            self.record(
                "decoder",
                lambda: {**feeds, "past_key": feeds["past_key"].copy(), "past_value": feeds["past_value"].copy()},
            )
        logits, new_key, new_value = self.decoder.run(None, feeds)
        if static:
            self.cache[0, ..., n, :] = new_key[..., 0, :]
            self.cache[1, ..., n, :] = new_value[..., 0, :]
        else:
            self.cache = np.concatenate([self.cache, np.stack([new_key, new_value])], axis=4)
        self.filled += width
        return logits[0]


def speech_parity_runner(artifact_format: str, path: Path, quantized: bool, source):
    """The runner parity uses for a Whisper artifact on this platform, and what that leaves unchecked here."""
    if artifact_format == "onnx":
        runner = WhisperONNXRunner(path, npu=True)
        if runner.shape["static"] and runner.providers[0] != QNN:
            return runner, f"{QNN_ABSENT} (the QDQ graphs ran on onnxruntime's CPU EP, the numerics QNN reproduces)"
        return runner, None
    if artifact_format == "ct2":
        return CT2Whisper(path), None
    if artifact_format == "coreml":
        if sys.platform == "darwin":
            return CoreMLWhisper(path), None
        return PackageWeightsWhisper(source, path), (
            f"{COREML_NEEDS_MACOS} (the packages' weights were read back, decompressed and run in transformers)"
        )
    if artifact_format == "mlx":
        if sys.platform == "darwin":
            return MLXWhisper(path), None
        if quantized:
            return MLXWhisper(path, dequantize=True), (
                "MLX quantized kernels (off a Mac the quantized weights were measured dequantized on MLX's CPU backend)"
            )
        return MLXWhisper(path), "MLX on Metal (measured on MLX's CPU backend, in float32)"
    raise EdgeportError(f"no Whisper runner for {artifact_format} artifacts in this version")


def speech_bench_runner(artifact_format: str, path: Path):
    if artifact_format == "onnx":
        return WhisperONNXRunner(path, npu=True)
    if artifact_format == "ct2":
        return CT2Whisper(path)
    if artifact_format == "coreml":
        return CoreMLWhisper(path)
    if artifact_format == "mlx":
        return MLXWhisper(path)
    raise EdgeportError(f"no Whisper runner for {artifact_format} artifacts in this version")


class CT2Whisper(WhisperRunner):
    """The CTranslate2 artifact: CTranslate2 encodes each window and decodes it greedily in C++, with the
    prompt and suppressed tokens of the shared loop."""

    def __init__(self, path: Path):
        import ctranslate2

        ct2_config = json.loads((path / "config.json").read_text())
        vocabulary = json.loads((path / "vocabulary.json").read_text())
        super().__init__(
            path,
            config={
                "vocab_size": len(vocabulary),
                "suppress_tokens": ct2_config.get("suppress_ids", []),
                "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", []),
            },
        )
        self.ct2 = ctranslate2
        ctranslate2.set_log_level(logging.ERROR)  # not the notice that float16 scales compute in float32 on a CPU
        self.model = ctranslate2.models.Whisper(str(path), device="cpu")
        self.engine = f"CTranslate2 {ctranslate2.__version__} (CPU, {self.model.compute_type})"
        if not self.model.is_multilingual:  # CTranslate2's own reading of the model decides what it can detect
            self.multilingual, self.languages = False, {}
            self.use_language(None)

    def encode(self, mel: np.ndarray):
        return self.model.encode(self.ct2.StorageView.from_array(np.ascontiguousarray(mel)))

    def detect_language(self, encoded) -> str:
        """CTranslate2's own detection: the same single decoder step from <|startoftranscript|>."""
        (ranked,) = self.model.detect_language(encoded)
        return ranked[0][0][2:-2]

    def decode(self, encoded) -> list[int]:
        result = self.model.generate(
            encoded,
            [self.prompt_for(encoded)],
            beam_size=1,
            max_length=self.max_tokens,
            suppress_blank=True,  # the begin_suppress tokens, as the shared loop suppresses them
            suppress_tokens=[-1],  # the model's suppress_ids
        )
        return [t for t in result[0].sequences_ids[0] if t != self.eot]


class MLXWhisper(WhisperRunner):
    """The MLX artifact in mlx-whisper's own model: its encoder once per window, its decoder per step with its
    KV cache."""

    def __init__(self, path: Path, dequantize: bool = False):
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


class CoreMLWhisper(WhisperRunner):
    """The Core ML artifact on macOS: `encoder.mlpackage` once per window, `decoder.mlpackage` one token per call,
    its KV cache Core ML state (iOS 18 / macOS 15 packages) or passed in and out (older ones)."""

    def __init__(self, path: Path):
        if sys.platform != "darwin":
            raise EdgeportError(f"{path}: {COREML_NEEDS_MACOS}; bench it on a Mac (macOS 15 or later)")
        import coremltools as ct

        super().__init__(path)
        self.details = json.loads((path / "coreml.json").read_text())
        units = getattr(ct.ComputeUnit, self.details["compute_units"])
        self.encoder = ct.models.MLModel(str(path / "encoder.mlpackage"), compute_units=units)
        self.decoder = ct.models.MLModel(str(path / "decoder.mlpackage"), compute_units=units)
        self.length = self.details["cache_shape"][3]
        self.engine = f"Core ML (coremltools {ct.__version__}, {self.details['compute_units']})"

    def encode(self, mel: np.ndarray):
        out = self.encoder.predict({"input_features": mel})
        return out["cross_key"].astype(np.float16), out["cross_value"].astype(np.float16)

    def begin(self, encoded) -> None:
        self.cross, self.filled = encoded, 0
        if self.details["kv_cache"] == "state":
            self.state = self.decoder.make_state()
        else:
            shape = list(self.details["cache_shape"])
            shape[3] -= 1  # the new token's slot is not passed in
            self.state = {"past_key": np.zeros(shape, np.float16), "past_value": np.zeros(shape, np.float16)}

    def step(self, tokens: list[int]) -> np.ndarray:
        for token in tokens:
            n = self.filled
            if n >= self.length - 1:
                raise EdgeportError(f"the decoder's cache holds {self.length} tokens")
            mask = np.full((1, 1, 1, self.length), -np.inf, np.float16)
            mask[..., :n] = 0
            mask[..., -1 if isinstance(self.state, dict) else n] = 0  # the token itself
            inputs = {
                "input_ids": np.array([[token]], np.int32),
                "position": np.array([n], np.int32),
                "attention_mask": mask,
                "cross_key": self.cross[0],
                "cross_value": self.cross[1],
            }
            if isinstance(self.state, dict):
                out = self.decoder.predict({**inputs, **self.state})
                self.state["past_key"][..., n, :] = out["new_key"][..., 0, :]
                self.state["past_value"][..., n, :] = out["new_value"][..., 0, :]
            else:
                out = self.decoder.predict(inputs, state=self.state)
            self.filled += 1
        return out["logits"][0, -1].astype(np.float32)


class PackageWeightsWhisper(TorchWhisper):
    """The source's architecture in transformers with the Core ML packages' weights, decompressed: what the
    compression did to the weights, measurable where the packages cannot run."""

    def __init__(self, source, path: Path):
        super().__init__(source)
        read, _ = load_package_weights(self.model, [path / "encoder.mlpackage", path / "decoder.mlpackage"])
        self.engine += f", with the packages' {read} weights read back and decompressed"
