"""Transcribe speech with edgeport's ONNX Whisper on a Windows-on-Snapdragon laptop's Hexagon NPU.

    pip install onnxruntime-qnn transformers soundfile soxr numpy
    python transcribe.py out/whisper-small-snapdragon-x-elite/onnx talk.wav [language]

encoder.onnx turns 30 s of log-mel features into every decoder layer's cross-attention keys and values;
decoder.onnx takes one token over the self-attention cache this script keeps (whisper.json describes both).
Greedy, no timestamps; audio longer than 30 s is cut into 30 s windows. A multilingual model's language is the
third argument (e.g. fr) or, without one, detected in each window as Whisper does: the most likely language token
after <|startoftranscript|>.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile
import soxr
from transformers import AutoTokenizer, WhisperFeatureExtractor

folder, audio_file = Path(sys.argv[1]), sys.argv[2]
language = sys.argv[3] if len(sys.argv) > 3 else None
shape = json.loads((folder / "whisper.json").read_text())
providers = [("QNNExecutionProvider", {"backend_path": "QnnHtp.dll"}), "CPUExecutionProvider"]
encoder = ort.InferenceSession(str(folder / "encoder.onnx"), providers=providers)
decoder = ort.InferenceSession(str(folder / "decoder.onnx"), providers=providers)
print("running on", decoder.get_providers()[0], file=sys.stderr)  # CPUExecutionProvider means no NPU was found

tokenizer = AutoTokenizer.from_pretrained(folder)
features = WhisperFeatureExtractor.from_pretrained(folder)
config = json.loads((folder / "config.json").read_text())
eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
multilingual = config["vocab_size"] >= 51865
start = ["<|startoftranscript|>"] + ([f"<|{language or 'en'}|>", "<|transcribe|>"] if multilingual else [])
first_language, translate = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|translate|>"])
languages = np.arange(first_language + 1, translate)  # Whisper's language tokens lie between these two
prompt = tokenizer.convert_tokens_to_ids([*start, "<|notimestamps|>"])
suppressed = np.zeros(config["vocab_size"], bool)
suppressed[config.get("suppress_tokens") or []] = True
suppressed[eot + 1 :] = True  # special tokens and timestamps
suppressed_first = suppressed.copy()  # a transcript does not start with a blank or end at once
suppressed_first[config.get("begin_suppress_tokens") or []] = True

samples, rate = soundfile.read(audio_file, dtype="float32", always_2d=True)
audio = soxr.resample(samples.mean(axis=1), rate, 16_000) if rate != 16_000 else samples.mean(axis=1)
length = shape["decoder_cache"]  # the static cache; the token being decoded sits after it
text = []
for begin in range(0, len(audio), 30 * 16_000):
    mel = features(audio[begin : begin + 30 * 16_000], sampling_rate=16_000, return_tensors="np").input_features
    cross_key, cross_value = encoder.run(None, {"input_features": mel.astype(np.float32)})
    cache = np.zeros((2, shape["layers"], 1, shape["heads"], length, shape["head_dim"]), np.float32)
    tokens = list(prompt)
    for n in range(length):
        mask = np.full((1, 1, 1, length + 1), shape["mask_value"], np.float32)
        mask[..., :n] = 0
        mask[..., -1] = 0
        feeds = {
            "input_ids": np.array([[tokens[n]]], np.int32),
            "position_ids": np.array([[n]], np.int32),
            "attention_mask": mask,
            "past_key": cache[0],
            "past_value": cache[1],
            "cross_key": cross_key,
            "cross_value": cross_value,
        }
        logits, new_key, new_value = decoder.run(None, feeds)
        cache[0, ..., n, :], cache[1, ..., n, :] = new_key[..., 0, :], new_value[..., 0, :]
        if multilingual and language is None and n == 0:  # detect this window's language
            tokens[1] = int(languages[np.argmax(logits[0, -1, languages])])
        if n + 1 < len(tokens):
            continue  # still reading the prompt
        first = len(tokens) == len(prompt)
        token = int(np.argmax(np.where(suppressed_first if first else suppressed, -np.inf, logits[0, -1])))
        if token == eot or len(tokens) >= 224:  # Whisper's sample length: half its 448-token context
            break
        tokens.append(token)
    text.append(tokenizer.decode(tokens[len(prompt) :], skip_special_tokens=True).strip())
print(" ".join(text))
