"""Speech in: any WAV/FLAC read as 16 kHz mono, cut into Whisper's 30 s windows, and the clips parity uses."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeport.errors import EdgeportError
from edgeport.headers import regular_file
from edgeport.texts import reference_paragraph

SAMPLE_RATE = 16_000  # what Whisper's features are computed at
WINDOW_S = 30.0  # Whisper's encoder sees 30 s at a time
SEARCH_S = 5.0  # a window longer audio is cut from ends at the quietest moment of its last SEARCH_S seconds
FRAME_S = 0.1  # the loudness of a moment: RMS over this much audio
CLIP_PACKAGE = "moonshine_voice"  # PyPI moonshine-voice==0.1.5 (MIT) carries both parity clips
CLIP_INSTALL = "pip install --no-deps moonshine-voice==0.1.5"


@dataclass(frozen=True)
class Clip:
    name: str
    audio: np.ndarray
    reference: str  # what is said


def load_audio(file: Path) -> np.ndarray:
    """`file` as float32 samples at 16 kHz, channels averaged; resampled by soxr when recorded at another rate."""
    import soundfile
    import soxr

    regular_file(file)  # a FIFO would never end
    try:
        samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise EdgeportError(f"{file}: cannot read it as audio ({e}); give a WAV or FLAC file") from e
    if samples.size == 0:
        raise EdgeportError(f"{file}: holds no audio samples")
    if not np.isfinite(samples).all():
        raise EdgeportError(f"{file}: holds samples that are not numbers (NaN or infinite); is it damaged?")
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def windows(audio: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample spans of at most 30 s covering all of `audio`. A span that must end before the audio
    does ends at the quietest 100 ms of its last 5 s, so that no word is cut in two (the energy split WhisperKit's
    chunker makes); nothing is dropped."""
    size, frame = int(WINDOW_S * SAMPLE_RATE), int(FRAME_S * SAMPLE_RATE)
    spans, start = [], 0
    while len(audio) - start > size:
        search = audio[start + size - int(SEARCH_S * SAMPLE_RATE) : start + size]
        frames = search[: len(search) // frame * frame].reshape(-1, frame)
        quietest = int(np.argmin(np.sqrt((frames**2).mean(axis=1))))
        end = start + size - len(search) + quietest * frame + frame // 2
        spans.append((start, end))
        start = end
    spans.append((start, len(audio)))
    return spans


def parity_clips() -> list[Clip]:
    """The speech every Whisper artifact transcribes for parity: a 44 s reading of A Tale of Two Cities' opening
    paragraph and a 10 s Beckett quote, from the moonshine-voice package."""
    spec = importlib.util.find_spec(CLIP_PACKAGE)
    if spec is None:
        raise EdgeportError(f"the speech parity clips are not installed: {CLIP_INSTALL}")
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
    return [
        Clip("two_cities.wav", load_audio(assets / "two_cities.wav"), reference_paragraph()),
        Clip(
            "beckett.wav",
            load_audio(assets / "beckett.wav"),
            "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better.",
        ),
    ]
