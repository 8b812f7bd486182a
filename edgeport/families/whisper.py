"""The Whisper family, a model of two components as Qualcomm's ai-hub-models treats it: an encoder run once per
30 s window of speech and a decoder run per token over its KV cache and the encoder's keys and values. Here are its
dimensions, what the plan predicts for it, how parity judges an artifact of it (WER on the parity speech against
the source's own transcripts), its bench workload and its table columns.

The plan is per 30 s window of speech:
- KV bytes      = the decoder's self-attention cache (448 tokens) and cross-attention cache (1500 frames), fp16
- peak memory   = weights + KV caches + the encoder's activations for one window (attention scores dominate)
- encoder time  = 2 x encoder parameters x 1500 frames / unit throughput: a compute roofline
- decode tok/s  = memory bandwidth / (decoder weights + KV caches read per token): a roofline
- RTF           = (encoder time + TOKENS_PER_WINDOW / decode tok/s) / 30 s; TTFT is the encoder time plus one token
each at the share of its roofline the engine's calibration gives (`speeds`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeport import calibration, quantization
from edgeport.audio import SAMPLE_RATE
from edgeport.calibration import ENGINES, Efficiency, Engine
from edgeport.errors import EdgeportError
from edgeport.files import read_json
from edgeport.parity import Metric, Parity, bounds_for, judge, wer
from edgeport.plan import GB, NORM_BYTES_PER_VALUE, Footprint, Step, room_text
from edgeport.targets import Target

WINDOW_S = 30.0
TOKENS_PER_WINDOW = 100  # English speech at about 150 words a minute, 1.3 tokens a word
# fit's sweep per format (ONNX's depends on the unit: see Whisper.quantizations), most bits first
SWEEP = {
    "ct2": ("fp16", "int8"),
    "mlx": ("fp16", "q8", "q4"),
    "coreml": ("fp16", "int8-channel", "int4-block32", "palettize4"),
}
COMPONENTS = ("encoder", "decoder")  # the graphs or packages every Whisper artifact but CTranslate2's holds
# The most encoder parameters the ONNX converter exports at a time: torch's exporter holds about four float32 copies
# of what it exports (2.5 GB for six of large-v3-turbo's layers).
SPAN_PARAMS = 64_000_000
PARITY_LANGUAGE = "en"  # the parity clips are English readings: no detection stands between the two transcripts


@dataclass(frozen=True)
class WhisperDims:
    """Whisper's dimensions, as its config.json gives them."""

    d_model: int
    vocab: int
    mels: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    encoder_heads: int
    decoder_heads: int
    frames: int  # encoder positions per 30 s window
    tokens: int  # the decoder's context

    @classmethod
    def from_config(cls, config: dict) -> "WhisperDims":
        try:
            return cls(
                d_model=config["d_model"],
                vocab=config["vocab_size"],
                mels=config["num_mel_bins"],
                encoder_layers=config["encoder_layers"],
                decoder_layers=config["decoder_layers"],
                encoder_ffn=config["encoder_ffn_dim"],
                decoder_ffn=config["decoder_ffn_dim"],
                encoder_heads=config["encoder_attention_heads"],
                decoder_heads=config.get("decoder_attention_heads") or config["encoder_attention_heads"],
                frames=config["max_source_positions"],
                tokens=config["max_target_positions"],
            )
        except KeyError as e:
            raise EdgeportError(f"config.json lacks {e.args[0]}, which the plan needs") from e

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_heads

    def cache_shape(self, length: int) -> tuple[int, int, int, int, int]:
        """The decoder's self-attention K (or V) cache over `length` tokens: layers, batch, heads, length, head dim."""
        return (self.decoder_layers, 1, self.decoder_heads, length, self.head_dim)

    @property
    def cross_shape(self) -> tuple[int, int, int, int, int]:
        """The encoder's keys (or values) as every decoder layer's cross-attention reads them."""
        return self.cache_shape(self.frames)

    def encoder_spans(self) -> list[tuple[int, int]]:
        """The encoder's layers in spans of at most SPAN_PARAMS (a larger layer alone), as the ONNX converter
        builds them, then (layers, layers): the final norm and the decoder's cross-attention projections, which
        read every decoder layer."""
        per_span = max(1, SPAN_PARAMS // self.encoder_layer_params)
        layers = self.encoder_layers
        return [(first, min(first + per_span, layers)) for first in range(0, layers, per_span)] + [(layers, layers)]

    @property
    def encoder_layer_params(self) -> int:
        """A layer's matrices: attention's four projections and the MLP's two."""
        return 4 * self.d_model**2 + 2 * self.d_model * self.encoder_ffn

    @property
    def decoder_layer_params(self) -> int:
        """A layer's matrices: self- and cross-attention's four projections each and the MLP's two."""
        return 8 * self.d_model**2 + 2 * self.d_model * self.decoder_ffn

    @property
    def unit_params(self) -> int:
        """The largest unit the ONNX converter reads and exports at once: a span of the encoder's layers, the
        decoder's layers (read also for their cross-attention projections), or the token embedding."""
        span = max(end - first for first, end in self.encoder_spans()) * self.encoder_layer_params
        return max(span, self.decoder_layers * self.decoder_layer_params, self.vocab * self.d_model)


@dataclass(frozen=True)
class WhisperSize:
    params: int
    matrix_params: int  # what gets quantized: projections, convolutions, token embedding
    frames: int  # encoder positions per 30 s window
    encoder_params: int
    decoder_matrix_params: int  # read per decoded token (the embedding doubles as the output projection)
    kv_values: int  # self-attention cache of max_target_positions tokens + cross-attention cache of one window
    activation_bytes: int  # the encoder's largest live tensors for one window

    @property
    def active_params(self) -> int:
        return self.params  # every weight works on every window


def whisper_size(config: dict) -> WhisperSize:
    """Parameter counts of a Whisper model from its config alone."""
    w = WhisperDims.from_config(config)
    d, frames, tokens = w.d_model, w.frames, w.tokens
    convs = 3 * w.mels * d + 3 * d * d
    encoder_matrix = convs + w.encoder_layers * w.encoder_layer_params
    decoder_matrix = w.vocab * d + w.decoder_layers * w.decoder_layer_params
    # positions, then per layer the biases (k_proj has none) and norms, then the conv biases and final norms
    vectors = (
        (frames + tokens) * d + w.encoder_layers * (8 * d + w.encoder_ffn) + w.decoder_layers * (13 * d + w.decoder_ffn)
    ) + 6 * d
    return WhisperSize(
        params=encoder_matrix + decoder_matrix + vectors,
        matrix_params=encoder_matrix + decoder_matrix,
        frames=frames,
        encoder_params=encoder_matrix + frames * d,
        decoder_matrix_params=decoder_matrix,
        kv_values=2 * w.decoder_layers * (tokens + frames) * d,
        activation_bytes=(w.encoder_heads * frames * frames + frames * (4 * d + w.encoder_ffn)) * 4,
    )


@dataclass
class SpeechReference:
    """The source's transcripts of the parity clips: made once in a process of their own, stored in the output
    folder, and read back by each artifact's parity run (the clips themselves come from their package)."""

    clips: list  # edgeport.audio.Clip
    transcripts: list[str]
    engine: str
    level: str  # "full" | "fast"

    FILE: ClassVar[str] = "transcripts.json"

    @classmethod
    def compute(cls, runner, level: str) -> "SpeechReference":
        from edgeport.audio import parity_clips
        from edgeport.engines.whisper import transcribe

        clips = parity_clips()[: 1 if level == "fast" else None]
        runner.use_language(PARITY_LANGUAGE)
        return cls(clips, [transcribe(runner, clip.audio).text for clip in clips], runner.engine, level)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        transcripts = {clip.name: text for clip, text in zip(self.clips, self.transcripts, strict=True)}
        data = {"engine": self.engine, "level": self.level, "transcripts": transcripts}
        (folder / self.FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "SpeechReference":
        from edgeport.audio import parity_clips

        data = read_json(folder / cls.FILE, "the parity reference of this output")
        clips = [clip for clip in parity_clips() if clip.name in data["transcripts"]]
        return cls(clips, [data["transcripts"][clip.name] for clip in clips], data["engine"], data["level"])


class Whisper:
    name = "whisper"
    runs = "runs Whisper as"  # "<target> runs Whisper as <formats>"
    auto_model = "AutoModelForSpeechSeq2Seq"
    workload = "transcribe"  # the module of edgeport.runtime that benches it
    metrics = ("wer_source", "wer_artifact", "wer_delta", "no_regression_share")
    speed_columns = ("encoder", "decode", "RTF")
    metric_columns = ("WER src → artifact", "Δ WER", "clips ok")

    # The plan

    def dims(self, config: dict) -> WhisperDims:
        return WhisperDims.from_config(config)

    def formats(self, target: Target) -> tuple:
        return target.speech_formats

    def quantizations(self, fmt: str, unit: str) -> tuple[str, ...]:
        """Every quantization `fit` sweeps for `fmt` on `unit`: what its converter builds for Whisper."""
        if fmt == "onnx":
            return ("w8a16",) if unit == "npu" else ("fp16", "int8")
        return SWEEP[fmt]

    def size(self, config: dict) -> WhisperSize:
        return whisper_size(config)

    def footprint(self, config: dict, context_length: int, target: Target) -> Footprint:
        """The paged reference holds the decoder whole and reads the encoder a layer at a time; the ONNX converter
        builds a unit at a time, the others the whole model."""
        w, size = self.dims(config), self.size(config)
        layer = (size.encoder_params - w.frames * w.d_model) // max(w.encoder_layers, 1)
        cache = 2 * 4 * w.decoder_layers * (w.tokens + w.frames) * w.d_model
        held = size.params - size.encoder_params + layer
        return Footprint(held, held, True, cache, size.params, w.unit_params)

    def context_length(self, source, target: Target) -> int:
        return source.config["max_target_positions"]

    def prompt_tokens(self, target: Target) -> int:
        return 0  # planned per 30 s window, not per prompt

    def step(self, size: WhisperSize, target: Target, fmt: str, quant_name: str, unit: str) -> Step:
        """The encoder's compute and the decoder's bandwidth at the calibrated shares (`speeds`)."""
        engine, efficiency = ENGINES[(fmt, unit)], calibration.efficiency(fmt, unit, target.name, target.backend(unit))
        kv = size.kv_values * engine.kv_bytes
        weights, peak = _memory(size, quant_name, fmt, kv + engine.runtime_bytes)
        quant, bandwidth, tflops = quantization.get(quant_name, fmt), target.bandwidth_gbs, target.tflops[unit]
        encode_roofline_s, decode_roofline = rooflines(size, quant, engine, bandwidth, tflops)
        encode_s, decode_tps = speeds(encode_roofline_s, decode_roofline, efficiency)
        rtf = real_time_factor(encode_s, decode_tps)
        usable = target.usable_ram_gb * GB
        fits = peak <= usable
        held = kv + engine.runtime_bytes
        largest = next((q for q in quantization.LADDERS[fmt] if _memory(size, q, fmt, held)[1] <= usable), None)
        room = room_text(peak, target)
        slow = bool(target.budget.rtf and rtf > target.budget.rtf)
        if not fits:
            verdict = f"does not fit: needs {room}" + (f"; {largest} would fit" if largest else "")
        elif slow:
            verdict = f"fits: {room}, but RTF ≈ {rtf:.3f} misses the {target.budget.rtf:g} budget"
        else:
            verdict = f"fits: {room}" + (f"; RTF ≈ {rtf:.3f} meets {target.budget.rtf:g}" if target.budget.rtf else "")
        return Step(
            format=fmt,
            quantization=quant_name,
            unit=unit,
            weight_bytes=weights,
            kv_bytes=kv,
            peak_bytes=peak,
            prefill_tps=round(size.frames / encode_s, 1),
            decode_tps=round(decode_tps, 1),
            ttft_s=round(encode_s + 1 / decode_tps, 4),
            fits=fits,
            verdict=verdict,
            largest_fitting=largest,
            rtf=round(rtf, 5),
            meets_budget=fits and not slow,
            misses=f"needs {room}"
            if not fits
            else f"RTF ≈ {rtf:.3f} misses the {target.budget.rtf:g} budget"
            if slow
            else "",
            prefill_roofline_tps=round(size.frames / encode_roofline_s, 1),
            decode_roofline_tps=round(decode_roofline, 1),
            calibration=efficiency.describe(engine),
        )

    # Parity

    def check_inputs(self, source) -> None:
        """Before any work: the parity speech must be at hand."""
        from edgeport.audio import parity_clips

        parity_clips()

    def reference(self, source, level: str) -> SpeechReference:
        from edgeport.engines.reference import TorchWhisper

        return SpeechReference.compute(TorchWhisper(source), level)

    def read_reference(self, folder: Path) -> SpeechReference:
        return SpeechReference.read(folder)

    def measure(self, reference: SpeechReference, runner, quant: str, not_checked: str | None = None) -> Parity:
        """Transcribe the parity clips with `runner` (one artifact) and compare its WER with the source's."""
        from edgeport.engines.whisper import transcribe

        clips = reference.clips
        runner.use_language(PARITY_LANGUAGE)
        texts = [transcribe(runner, clip.audio).text for clip in clips]
        spoken = [clip.reference for clip in clips]
        source_wer, artifact_wer = wer(spoken, reference.transcripts), wer(spoken, texts)
        no_worse = [
            wer(clip.reference, text) <= wer(clip.reference, source)
            for clip, text, source in zip(clips, texts, reference.transcripts, strict=True)
        ]
        metrics = {
            "clips": [clip.name for clip in clips],
            "audio_s": round(sum(len(clip.audio) for clip in clips) / SAMPLE_RATE, 2),
            "wer_source": round(source_wer, 4),
            "wer_artifact": round(artifact_wer, 4),
            "wer_delta": round(artifact_wer - source_wer, 4),
            "no_regression_share": round(sum(no_worse) / len(clips), 3),
            "transcripts": texts,
            "source_transcripts": reference.transcripts,
        }
        judged = [Metric("wer_delta", metrics["wer_delta"], bounds_for(quant).wer_delta)]
        return judge(metrics, judged, f"source: {reference.engine}; artifact: {runner.engine}", not_checked)

    # What a person reads

    def plan_speeds(self, step: Step) -> list[str]:
        return [f"{step.ttft_s:.3f} s", f"{step.decode_tps:,.0f}", f"{step.rtf:.4f}"]

    def plan_rooflines(self, step: Step) -> str:
        return f"encoder {step.prefill_roofline_tps:,.0f} frames/s, decode {step.decode_roofline_tps:,.0f} tok/s"

    def plan_note(self, plan, kv: str) -> str:
        return (
            f"per 30 s window of speech; KV caches ({kv}) at {plan.context_length} tokens and 1500 frames; RTF "
            f"assumes {TOKENS_PER_WINDOW} tokens a window"
        )

    def metric_cells(self, metrics: dict, num) -> list[str]:
        return [
            f"{num(metrics, 'wer_source', '.3f')} → {num(metrics, 'wer_artifact', '.3f')}",
            num(metrics, "wer_delta", "+.3f"),
            num(metrics, "no_regression_share", ".0%"),
        ]

    def metric_notes(self, name: str, metrics: dict, num) -> list[str]:
        return []


def rooflines(
    size: WhisperSize, quant: quantization.Quantization, engine: Engine, bandwidth_gbs: float, tflops: float
) -> tuple[float, float]:
    """A window's encoder seconds at the unit's throughput, and decode tok/s at the memory bandwidth."""
    encode_s = 2 * size.encoder_params * size.frames / (tflops * 1e12)
    read = size.decoder_matrix_params * quant.bits_per_weight() / 8 + size.kv_values * engine.kv_bytes
    return encode_s, bandwidth_gbs * GB / read


def speeds(encode_roofline_s: float, decode_roofline_tps: float, efficiency: Efficiency) -> tuple[float, float]:
    """The encoder seconds and decode tok/s the plan expects from their rooflines: at the share of the RTF roofline
    the engine's transcription rows give, or where it has none, at the shares its causal LM rows give (the same
    engine on the same unit)."""
    if efficiency.rows("speech"):
        return encode_roofline_s / efficiency.speech, decode_roofline_tps * efficiency.speech
    return encode_roofline_s / efficiency.prefill, efficiency.decode_tps(decode_roofline_tps)


def real_time_factor(encode_s: float, decode_tps: float) -> float:
    """Seconds to transcribe a 30 s window (TOKENS_PER_WINDOW tokens) over its 30 s."""
    return (encode_s + TOKENS_PER_WINDOW / decode_tps) / WINDOW_S


def _memory(size: WhisperSize, quant_name: str, fmt: str, held: int) -> tuple[int, int]:
    """Weight bytes and peak bytes of Whisper at a quantization, with what the engine `held` beside them (its KV
    caches and its runtime)."""
    bits = quantization.get(quant_name, fmt).bits_per_weight()
    weights = int(size.matrix_params * bits / 8 + (size.params - size.matrix_params) * NORM_BYTES_PER_VALUE)
    return weights, weights + held + size.activation_bytes
