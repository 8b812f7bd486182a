"""One runner per format: next-token logits for parity, and a streamed generate for the bench."""

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.errors import EdgeportError
from edgeport.runtime.summarize import peak_rss_bytes

CPU, QNN = "CPUExecutionProvider", "QNNExecutionProvider"
QNN_ABSENT = "QNN execution provider not available"
COREML_NEEDS_MACOS = "Core ML prediction needs macOS"


@dataclass
class Token:
    """One streamed token and the engine's running figures."""

    text: str
    id: int
    elapsed_s: float  # since generate was called
    prompt_tokens: int
    prompt_tps: float
    generated: int
    generation_tps: float
    peak_memory_gb: float


class TorchRunner:
    """The source in transformers on the CPU, float32: the parity reference."""

    engine = "transformers (torch, CPU, float32)"

    def __init__(self, source):
        import torch

        self.torch = torch
        self.model = source.load_reference()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids])).logits[0]
        return out.float().numpy()


class MLXRunner:
    """An MLX artifact through mlx-lm."""

    def __init__(self, path: Path, dequantize: bool = False):
        try:
            import mlx.core as mx
            import mlx_lm
        except ImportError as e:
            raise EdgeportError(f"running MLX artifacts needs mlx-lm: pip install 'edgeport[mlx]' ({e})") from e
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


class ONNXRunner:
    """The ONNX CPU shape: onnxruntime-genai's generator for the bench, the bare graph on onnxruntime for logits."""

    def __init__(self, path: Path):
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise EdgeportError(
                f"running ONNX artifacts needs onnxruntime-genai: pip install 'edgeport[onnx]' ({e})"
            ) from e
        self.path, self.og = path, og
        self.model = og.Model(str(path))
        self.tokenizer = _hf_tokenizer(path)  # chat templates, as every runner's
        self.og_tokenizer = og.Tokenizer(self.model)  # streaming detokenization in C++, off the decode loop's back
        self.engine = f"onnxruntime-genai {og.__version__} (CPU)"
        self.decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        self._session = None  # the bare graph, for logits: loaded only when parity asks

    def logits(self, ids: list[int]) -> np.ndarray:
        import onnxruntime as ort

        decoder = self.decoder
        if self._session is None:
            self._session = ort.InferenceSession(str(self.path / decoder["filename"]), providers=[CPU])
        empty_past = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
        feeds = {}
        for i in self._session.get_inputs():
            dtype = np.float16 if "float16" in i.type else np.float32
            if i.name == "input_ids":
                feeds[i.name] = np.array([ids], np.int64)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, len(ids)), np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(len(ids), dtype=np.int64)[None]
            else:
                feeds[i.name] = np.zeros(empty_past, dtype)
        return self._session.run(["logits"], feeds)[0][0].astype(np.float32)

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_tokens, do_sample=False)
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        clock, text = _TokenClock(len(prompt), start), self.og_tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            yield clock.token(text.decode(token), token)
            if clock.generated >= max_tokens:
                break


class StaticKVRunner:
    """The ONNX NPU shape: `prefill.onnx` over a fixed chunk and `decode.onnx` over one token, both reading the
    fixed-length KV cache this loop keeps, as an app on the device does. With `npu`, onnxruntime's QNN EP (HTP
    backend) runs it where onnxruntime-qnn provides one; the CPU EP otherwise, and always here."""

    def __init__(self, path: Path, npu: bool = False):
        import onnxruntime as ort

        shape = json.loads((path / "npu.json").read_text())
        self.prefill_chunk, self.context = shape["prefill_chunk"], shape["context_length"]
        self.layers, self.mask_value = shape["layers"], shape["mask_value"]
        self.cache_shape = (shape["layers"], 2, 1, shape["kv_heads"], shape["context_length"], shape["head_dim"])
        providers = onnx_providers(npu)
        self.sessions = {
            self.prefill_chunk: ort.InferenceSession(str(path / "prefill.onnx"), providers=providers),
            1: ort.InferenceSession(str(path / "decode.onnx"), providers=providers),
        }
        self.providers = self.sessions[1].get_providers()  # what onnxruntime actually took
        self.tokenizer = _hf_tokenizer(path)
        self.engine = f"onnxruntime {ort.__version__} ({self.providers[0]}), static KV cache"
        self.record = None  # calibration: told (width, feeds) of every call

    def logits(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return np.concatenate(
            [
                self._call(ids[i : i + self.prefill_chunk], self.prefill_chunk)
                for i in range(0, len(ids), self.prefill_chunk)
            ]
        )

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        self.reset()
        start = time.perf_counter()
        for i in range(0, len(prompt), self.prefill_chunk):
            logits = self._call(prompt[i : i + self.prefill_chunk], self.prefill_chunk)
        clock = _TokenClock(len(prompt), start)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            yield clock.token(self.tokenizer.decode([token]), token)
            if token == self.tokenizer.eos_token_id or clock.generated >= max_tokens:
                break
            logits = self._call([token], 1)

    def feeds(self, tokens: list[int], width: int) -> dict[str, np.ndarray]:
        """The inputs of the graph of `width` for `tokens` (padded to it) after the cache's filled positions."""
        n = self.filled
        if n + width > self.context:
            raise EdgeportError(f"the static KV cache holds {self.context} tokens; this call needs {n + width}")
        past = self.context - width
        mask = np.full((1, 1, width, self.context), self.mask_value, np.float32)
        mask[..., :n] = 0  # the tokens already in the cache
        mask[0, 0][:, past:] = np.where(np.tri(width, dtype=bool), 0, self.mask_value)  # causal among the new
        feeds = {
            "input_ids": np.array([tokens + [0] * (width - len(tokens))], np.int32),
            "position_ids": np.arange(n, n + width, dtype=np.int32)[None],
            "attention_mask": mask,
        }
        for layer in range(self.layers):
            feeds[f"past_key_{layer}"] = self.cache[layer, 0, ..., :past, :]
            feeds[f"past_value_{layer}"] = self.cache[layer, 1, ..., :past, :]
        return feeds

    def _call(self, tokens: list[int], width: int) -> np.ndarray:
        """Run the graph of `width` on `tokens`; write their keys and values into the cache."""
        feeds = self.feeds(tokens, width)
        if self.record:
            self.record(width, {k: v.copy() for k, v in feeds.items()})
        logits, *new = self.sessions[width].run(None, feeds)
        n, real = self.filled, len(tokens)
        for layer in range(self.layers):
            self.cache[layer, 0, ..., n : n + real, :] = new[2 * layer][..., :real, :]
            self.cache[layer, 1, ..., n : n + real, :] = new[2 * layer + 1][..., :real, :]
        self.filled += real
        return logits[0, :real]

    def reset(self) -> None:
        self.cache = np.zeros(self.cache_shape, np.float32)
        self.filled = 0


class CoreMLRunner:
    """A Core ML package on macOS: prefill and decode through coremltools' prediction API, the KV cache kept as
    Core ML state (iOS 18 / macOS 15 packages) or passed in and out (older ones)."""

    def __init__(self, path: Path):
        if sys.platform != "darwin":
            raise EdgeportError(f"{path}: {COREML_NEEDS_MACOS}; bench it on a Mac (macOS 15 or later)")
        import coremltools as ct

        self.details = json.loads((path / "coreml.json").read_text())
        units = getattr(ct.ComputeUnit, self.details["compute_units"])
        package, self.context = str(path / "model.mlpackage"), self.details["context_length"]
        if self.details["prefill_chunk"]:  # the Neural Engine shape: static prefill and decode functions
            self.decoder = ct.models.MLModel(package, compute_units=units, function_name="decode")
            self.prefiller = ct.models.MLModel(package, compute_units=units, function_name="prefill")
            self.chunk = self.details["prefill_chunk"]
        else:
            self.decoder = self.prefiller = ct.models.MLModel(package, compute_units=units)
            self.chunk = None
        self.tokenizer = _hf_tokenizer(path)
        self.engine = f"Core ML (coremltools {ct.__version__}, {self.details['compute_units']})"

    def logits(self, ids: list[int]) -> np.ndarray:
        state = self._new_cache()
        return np.concatenate(list(self._prefill(ids, state)))

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        start = time.perf_counter()
        state = self._new_cache()
        logits = list(self._prefill(prompt, state))[-1]
        clock, position = _TokenClock(len(prompt), start), len(prompt)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            yield clock.token(self.tokenizer.decode([token]), token)
            if token == self.tokenizer.eos_token_id or clock.generated >= max_tokens or position >= self.context:
                break
            logits = self._predict(self.decoder, [token], position, 1, state)
            position += 1

    def _prefill(self, ids: list[int], state) -> Iterator[np.ndarray]:
        width = self.chunk or len(ids)
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width]
            yield self._predict(self.prefiller, chunk, start, width, state)[: len(chunk)]

    def _predict(self, model, tokens: list[int], position: int, width: int, state) -> np.ndarray:
        attended = self.context if self.chunk else position + width
        mask = np.full((1, 1, width, attended), -np.inf, np.float16)
        for row in range(width):
            mask[0, 0, row, : position + row + 1] = 0
        ids = np.array([tokens + [0] * (width - len(tokens))], np.int32)
        inputs = {"input_ids": ids, "causal_mask": mask, "position": np.array([position], np.int32)}
        if isinstance(state, dict):  # before iOS 18 / macOS 15 the cache goes in and comes back out
            out = model.predict({**inputs, **state})
            state.update(keyCache=out["keyCacheOut"], valueCache=out["valueCacheOut"])
        else:
            out = model.predict(inputs, state=state)
        return out["logits"][0].astype(np.float32)

    def _new_cache(self):
        if self.details["kv_cache"] == "state":
            return self.decoder.make_state()
        shape = self.details["cache_shape"]
        return {"keyCache": np.zeros(shape, np.float16), "valueCache": np.zeros(shape, np.float16)}


class PackageWeightsRunner(TorchRunner):
    """The source's architecture in transformers with a Core ML package's weights, decompressed: what the
    compression did to the weights, measurable where the package itself cannot run."""

    def __init__(self, source, path: Path):
        super().__init__(source)
        read, total = load_package_weights(self.model, [path / "model.mlpackage"])
        self.engine = (
            f"transformers (torch, CPU, float32) with the package's weights: {read} of {total} "
            "read back and decompressed, the other (norm scales) rounded to fp16 as the package stores them"
        )


def load_package_weights(model, packages: list[Path]) -> tuple[int, int]:
    """Overwrite `model`'s parameters with the weights read back from Core ML `packages`, decompressed. A vector
    the converter folded away (a norm scale) or merged with an equal one is rounded to fp16, as the package
    computes it; a missing matrix is an error. Returns (parameters read back, parameters)."""
    import torch

    from edgeport.convert.coreml import read_weights

    parameters = dict(model.named_parameters())  # tied weights appear once
    weights = {}
    for package in packages:
        weights.update(read_weights(package, list(parameters)))
    missing = [name for name, p in parameters.items() if name not in weights and p.dim() > 1]
    if missing:
        raise EdgeportError(f"{packages[0].parent}: the package has no weight for {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name in weights:
                parameter.copy_(torch.from_numpy(weights[name]).reshape(parameter.shape))
            else:
                parameter.copy_(parameter.to(torch.float16).to(torch.float32))
    return len(weights), len(parameters)


class _TokenClock:
    """Turns a stream of generated tokens into Tokens with TTFT, prefill and decode rates; memory is the
    process's peak RSS (onnxruntime reports none of its own)."""

    def __init__(self, prompt_tokens: int, start: float):
        self.prompt_tokens, self.start = prompt_tokens, start
        self.generated = 0
        self.first_at = 0.0

    def token(self, text: str, token_id: int) -> Token:
        elapsed = time.perf_counter() - self.start
        self.generated += 1
        if self.generated == 1:
            self.first_at = elapsed
        decode_time = elapsed - self.first_at
        return Token(
            text,
            token_id,
            elapsed,
            self.prompt_tokens,
            self.prompt_tokens / self.first_at if self.first_at else 0.0,
            self.generated,
            (self.generated - 1) / decode_time if decode_time > 0 else 0.0,
            peak_rss_bytes() / 1e9,
        )


def onnx_providers(npu: bool) -> list:
    """onnxruntime's execution providers for a graph: QNN's HTP (NPU) backend first when `npu` and
    onnxruntime-qnn provides it, the CPU EP always."""
    import onnxruntime as ort

    providers: list = [CPU]
    if npu and QNN in ort.get_available_providers():
        backend = "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"
        providers.insert(0, (QNN, {"backend_path": backend}))
    return providers


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def parity_runner(artifact_format: str, path: Path, quantized: bool, source):
    """The runner parity uses for an artifact on this platform, and what that leaves unchecked here."""
    if artifact_format == "coreml":
        if sys.platform == "darwin":
            return CoreMLRunner(path), None
        return PackageWeightsRunner(source, path), (
            f"{COREML_NEEDS_MACOS} (the package's weights were read back, decompressed and run in transformers)"
        )
    if artifact_format == "mlx":
        if sys.platform == "darwin":
            return MLXRunner(path), None
        if quantized:
            return MLXRunner(path, dequantize=True), (
                "MLX quantized kernels (off a Mac they take minutes per pass: the quantized weights were "
                "measured dequantized to float32 on MLX's CPU backend)"
            )
        return MLXRunner(path), "MLX on Metal (measured on MLX's CPU backend)"
    if artifact_format == "onnx":
        if not (path / "npu.json").exists():
            return ONNXRunner(path), None
        runner = StaticKVRunner(path, npu=True)
        if runner.providers[0] != QNN:
            return runner, f"{QNN_ABSENT} (the QDQ graphs ran on onnxruntime's CPU EP, the numerics QNN reproduces)"
        return runner, None
    raise EdgeportError(f"no runner for {artifact_format} artifacts in this version")


def bench_runner(artifact_format: str, path: Path):
    if artifact_format == "coreml":
        return CoreMLRunner(path)
    if artifact_format == "mlx":
        return MLXRunner(path)
    if artifact_format == "onnx":
        return StaticKVRunner(path, npu=True) if (path / "npu.json").exists() else ONNXRunner(path)
    raise EdgeportError(f"no runner for {artifact_format} artifacts in this version")
