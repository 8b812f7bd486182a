"""ONNX artifacts on onnxruntime: the CPU shape through onnxruntime-genai's generator (its bare graph for logits),
the NPU shapes through the static-KV loops an app on the device runs, with QNN's HTP backend where
onnxruntime-qnn provides it and the CPU EP otherwise.

The loops take an explicit `on_call(graph, feeds)` hook: calibration is told every graph call and can ask for a
copy of its inputs."""

import json
import sys
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from edgeport.engines import missing
from edgeport.engines.loop import Token, TokenClock, hf_tokenizer, mask_new_at_end
from edgeport.engines.whisper import WhisperRunner
from edgeport.errors import EdgeportError
from edgeport.layouts import Layout, OnnxCPU, OnnxNPU, OnnxPart, OnnxWhisper

CPU, QNN = "CPUExecutionProvider", "QNNExecutionProvider"
QNN_ABSENT = "QNN execution provider not available"
ON_CPU_EP = f"{QNN_ABSENT} (the QDQ graphs ran on onnxruntime's CPU EP, the numerics QNN reproduces)"
NOT_NPU_FIGURES = f"{QNN_ABSENT}: the NPU graphs ran on onnxruntime's CPU EP, so these are not NPU figures"

CallHook = Callable[[str, Callable[[], dict]], None]  # (graph, a function returning a copy of its feeds)


def unavailable_here() -> str | None:
    return missing("onnxruntime", "onnx")


def qnn_unavailable() -> str | None:
    """Why QNN's HTP backend cannot run the NPU graphs here, or None when onnxruntime has its EP."""
    import onnxruntime as ort

    return None if QNN in ort.get_available_providers() else QNN_ABSENT


def runner(layout: Layout, folder: Path):
    if isinstance(layout, OnnxCPU):
        return ONNXRunner(folder)
    if isinstance(layout, OnnxNPU):
        return StaticKVRunner(folder, npu=True)
    return WhisperONNXRunner(folder, npu=True)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    if isinstance(layout, OnnxWhisper):
        opened = WhisperONNXRunner(folder, npu=True, one_at_a_time=True)
    else:
        opened = runner(layout, folder)
    return opened, ON_CPU_EP if layout.for_qnn and opened.providers[0] != QNN else None


def not_npu_figures(layout: Layout, runner) -> str | None:
    """What a bench of `layout` must say when its NPU graphs ran on the CPU EP here, or None."""
    return NOT_NPU_FIGURES if layout.for_qnn and runner.providers[0] != QNN else None


def providers(npu: bool) -> list:
    """onnxruntime's execution providers for a graph: QNN's HTP (NPU) backend first when `npu` and
    onnxruntime-qnn provides it, the CPU EP always."""
    chosen: list = [CPU]
    if npu and qnn_unavailable() is None:
        backend = "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"
        chosen.insert(0, (QNN, {"backend_path": backend}))
    return chosen


class ONNXRunner:
    """The ONNX CPU shape: onnxruntime-genai's generator for the bench, the bare graph on onnxruntime for logits."""

    def __init__(self, path: Path):
        reason = missing("onnxruntime_genai", "onnx")
        if reason:
            raise EdgeportError(reason)
        import onnxruntime_genai as og

        self.path, self.og = path, og
        self.tokenizer = hf_tokenizer(path)  # chat templates, as every runner's
        self.engine = f"onnxruntime-genai {og.__version__} (CPU)"
        self.providers = [CPU]
        self.decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        self._session = None  # the bare graph, for logits: loaded only when parity asks

    @cached_property
    def model(self):
        """onnxruntime-genai's model, loaded when the bench first asks: parity runs the bare graph alone, without
        a second copy of the weights beside it."""
        return self.og.Model(str(self.path))

    def logits(self, ids: list[int]) -> np.ndarray:
        import onnxruntime as ort

        decoder = self.decoder
        if self._session is None:
            self._session = ort.InferenceSession(str(self.path / decoder["filename"]), _no_arena(), providers=[CPU])
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
        clock = TokenClock(len(prompt), start)
        while not generator.is_done():
            generator.generate_next_token()
            yield clock.token(int(generator.get_next_tokens()[0]))
            if clock.generated >= max_tokens:
                break


class PartRunner:
    """One part of the ONNX NPU shape over its own layers' slice of the static KV cache. Each graph is opened when
    first called, and let go by clearing `sessions`, so a caller can hold one part's weights at a time."""

    def __init__(self, path: Path, layout: OnnxNPU, part: OnnxPart, chosen: list, on_call: CallHook | None = None):
        self.path, self.layout, self.part, self.chosen, self.on_call = path, layout, part, chosen, on_call
        self.sessions: dict[int, object] = {}
        self.reset()

    def reset(self) -> None:
        layout = self.layout
        shape = (len(self.part.layers), 2, 1, layout.kv_heads, layout.context_length, layout.head_dim)
        self.cache = np.zeros(shape, np.float32)

    def feeds(self, given: np.ndarray, filled: int, width: int) -> dict[str, np.ndarray]:
        """The inputs of the graph of `width` for `given` (token ids or hidden states, padded to it) after the
        cache's `filled` positions."""
        context = self.layout.context_length
        if filled + width > context:
            raise EdgeportError(f"the static KV cache holds {context} tokens; this call needs {filled + width}")
        past = context - width
        feeds = {
            "input_ids": given,
            "hidden_states": given,
            "position_ids": np.arange(filled, filled + width, dtype=np.int32)[None],
            "attention_mask": mask_new_at_end(filled, width, context, self.layout.mask_value),
        }
        for i, layer in enumerate(self.part.layers):
            feeds[f"past_key_{layer}"] = self.cache[i, 0, ..., :past, :]
            feeds[f"past_value_{layer}"] = self.cache[i, 1, ..., :past, :]
        # what the graph reads: token ids where it holds the embedding, else hidden states (an embedding exported
        # on its own may not read the positions or the mask)
        return {i.name: feeds[i.name] for i in self.session(width).get_inputs()}

    def call(self, given: np.ndarray, filled: int, width: int, real: int) -> np.ndarray:
        """Run the graph of `width`; write the keys and values of its `real` tokens into the cache. Returns its
        output: the hidden states the next part takes, or the logits."""
        feeds = self.feeds(given, filled, width)
        if self.on_call:
            graph = "decode" if width == 1 else "prefill"
            self.on_call(graph, lambda: {k: v.copy() for k, v in feeds.items()})
        out, *new = self.session(width).run(None, feeds)
        for i in range(len(self.part.layers)):
            self.cache[i, 0, ..., filled : filled + real, :] = new[2 * i][..., :real, :]
            self.cache[i, 1, ..., filled : filled + real, :] = new[2 * i + 1][..., :real, :]
        return out

    def session(self, width: int):
        import onnxruntime as ort

        if width not in self.sessions:
            file = str(self.path / self.part.graph(width))
            self.sessions[width] = ort.InferenceSession(file, _no_arena(), providers=self.chosen)
        return self.sessions[width]


def _no_arena():
    """onnxruntime's session options with no arena and no memory pattern: a call's buffers (on the CPU EP, each
    8-bit or 16-bit weight of the NPU shape dequantized to float32 as it runs) are given back when it ends rather
    than kept for the next. At the same speed, a Llama-3.1-8B part of the NPU shape peaks 22 % lower (2.33 GB
    against 2.99)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = options.enable_mem_pattern = False
    return options


def part_calls(runner: PartRunner, calls: list[tuple[int, int]], given: list[np.ndarray]) -> Iterator[np.ndarray]:
    """One part over a sequence of calls from an empty cache, each (real tokens, graph width) on its input in
    `given` (token ids, or the previous part's outputs); yields the part's outputs, in order."""
    filled = 0
    runner.reset()
    for (real, width), x in zip(calls, given, strict=True):
        yield runner.call(x, filled, width, real)
        filled += real


class StaticKVRunner:
    """The ONNX NPU shape: its parts in order, each a graph over a fixed prefill chunk and one over a single token,
    all reading the fixed-length KV cache this loop keeps, as an app on the device does. With `npu`, onnxruntime's
    QNN EP (HTP backend) runs it where onnxruntime-qnn provides one; the CPU EP otherwise, and always here.
    `logits` runs a part at a time over the whole sequence, so it holds one part's weights at a time."""

    def __init__(self, path: Path, npu: bool = False, on_call: CallHook | None = None):
        import onnxruntime as ort

        self.path, self.layout = path, OnnxNPU.read(path)
        layout = self.layout
        self.prefill_chunk, self.context = layout.prefill_chunk, layout.context_length
        self.chosen = providers(npu)
        self.providers = [p if isinstance(p, str) else p[0] for p in self.chosen]
        self.parts = [PartRunner(path, layout, part, self.chosen, on_call) for part in layout.parts]
        self.tokenizer = hf_tokenizer(path)
        self.engine = f"onnxruntime {ort.__version__} ({self.providers[0]}), static KV cache, {len(self.parts)} parts"

    def logits(self, ids: list[int]) -> np.ndarray:
        width = self.prefill_chunk
        chunks = [ids[i : i + width] for i in range(0, len(ids), width)]
        calls = [(len(chunk), width) for chunk in chunks]
        given = [np.array([chunk + [0] * (width - len(chunk))], np.int32) for chunk in chunks]
        *inner, last = self.parts
        for part in inner:
            given = list(part_calls(part, calls, given))
            part.sessions.clear()  # its weights go before the next part's come
        logits, filled = None, 0
        for (real, _), out in zip(calls, part_calls(last, calls, given), strict=True):  # a call's logits at a time
            if logits is None:
                logits = np.empty((len(ids), out.shape[-1]), out.dtype)
            logits[filled : filled + real] = out[0, :real]
            filled += real
        last.sessions.clear()
        return logits

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        self.reset()
        start = time.perf_counter()
        for i in range(0, len(prompt), self.prefill_chunk):
            logits = self._call(prompt[i : i + self.prefill_chunk], self.prefill_chunk)
        clock = TokenClock(len(prompt), start)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            yield clock.token(token)
            if token == self.tokenizer.eos_token_id or clock.generated >= max_tokens:
                break
            logits = self._call([token], 1)

    def _call(self, tokens: list[int], width: int) -> np.ndarray:
        """Run every part's graph of `width` on `tokens`; their keys and values go into the parts' caches."""
        out = np.array([tokens + [0] * (width - len(tokens))], np.int32)
        for part in self.parts:
            out = part.call(out, self.filled, width, len(tokens))
        self.filled += len(tokens)
        return out[0, : len(tokens)]

    def reset(self) -> None:
        for part in self.parts:
            part.reset()
        self.filled = 0


class WhisperONNXRunner(WhisperRunner):
    """The ONNX Whisper artifact: `encoder.onnx` once per window, then `decoder.onnx` per step over the KV cache
    this loop keeps. The NPU shape is fed one token at a time over its fixed cache, with QNN's EP where
    onnxruntime-qnn provides one."""

    def __init__(
        self,
        path: Path,
        npu: bool = False,
        on_call: CallHook | None = None,
        sessions=None,
        one_at_a_time: bool = False,
    ):
        """`sessions`: what runs the encoder and the decoder, in place of sessions of encoder.onnx and decoder.onnx
        (the converter's float graphs built in units; no encoder where it computes what the encoder hands on).
        `one_at_a_time`: hold only the graph running, the encoder's or the decoder's, each opened as it is needed
        (a second or two a window): parity's way, which then holds the weights of one of them at a time."""
        import onnxruntime as ort

        super().__init__(path)
        self.path, self.layout = path, OnnxWhisper.read(path)
        self.chosen, self.one_at_a_time = providers(npu), one_at_a_time
        if sessions is None:
            sessions = (None if one_at_a_time else self._open("encoder"), self._open("decoder"))
        self.encoder, self.decoder = sessions
        self.providers = self.decoder.get_providers()
        self.engine = f"onnxruntime {ort.__version__} ({self.providers[0]})"
        self.on_call = on_call

    def _open(self, graph: str):
        import onnxruntime as ort

        # The encoder runs once a window, on activations of up to 180 MB (large-v3-turbo's attention): onnxruntime's
        # arena would keep 0.7 GB of them between windows, and saves 5 % of the encoder's time. The decoder's many
        # small calls keep it.
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = graph == "decoder"
        return ort.InferenceSession(str(self.path / f"{graph}.onnx"), options, providers=self.chosen)

    def encode(self, mel: np.ndarray):
        feeds = {"input_features": mel}
        if self.on_call:
            self.on_call("encoder", lambda: feeds)
        if not self.one_at_a_time:
            return self.encoder.run(None, feeds)
        self.decoder = None
        return self._open("encoder").run(None, feeds)

    def begin(self, encoded) -> None:
        self.cross_key, self.cross_value = encoded
        layout = self.layout
        length = layout.decoder_cache or 0
        self.cache = np.zeros((2, layout.layers, 1, layout.heads, length, layout.head_dim), np.float32)
        self.filled = 0

    def step(self, tokens: list[int]) -> np.ndarray:
        if not self.layout.static:
            return self._call(tokens)[-1]
        for token in tokens:
            logits = self._call([token])
        return logits[-1]

    def _call(self, tokens: list[int]) -> np.ndarray:
        n, width, layout = self.filled, len(tokens), self.layout
        if layout.static and n >= layout.decoder_cache:
            raise EdgeportError(f"the decoder's static cache holds {layout.decoder_cache} tokens")
        attended = self.cache.shape[4] + 1 if layout.static else n + width  # the static cache and the token itself
        feeds = {
            "input_ids": np.array([tokens], np.int32),
            "position_ids": np.arange(n, n + width, dtype=np.int32)[None],
            "attention_mask": mask_new_at_end(n, width, attended, layout.mask_value),
            "past_key": self.cache[0],
            "past_value": self.cache[1],
            "cross_key": self.cross_key,
            "cross_value": self.cross_value,
        }
        if self.on_call:
            self.on_call(
                "decoder",
                lambda: {**feeds, "past_key": feeds["past_key"].copy(), "past_value": feeds["past_value"].copy()},
            )
        if self.decoder is None:
            self.decoder = self._open("decoder")
        logits, new_key, new_value = self.decoder.run(None, feeds)
        if layout.static:
            self.cache[0, ..., n, :] = new_key[..., 0, :]
            self.cache[1, ..., n, :] = new_value[..., 0, :]
        else:
            self.cache = np.concatenate([self.cache, np.stack([new_key, new_value])], axis=4)
        self.filled += width
        return logits[0]
