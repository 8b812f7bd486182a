"""Run edgeport's ONNX NPU shape on a Windows-on-Snapdragon laptop's Hexagon NPU.

    pip install onnxruntime-qnn tokenizers numpy
    python generate.py out/my-model-snapdragon-x-elite/onnx "Summarize: ..."

The model comes in parts of consecutive layers, run in order (npu.json lists them): each has a static prefill graph
over a fixed chunk of tokens and a decode graph over one token, both reading the KV cache of its own layers that
this script keeps. The first part takes input_ids, each other one the previous part's output_hidden_states as
hidden_states; the last returns logits. Greedy decoding, for brevity.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder, request = Path(sys.argv[1]), sys.argv[2]
npu = json.loads((folder / "npu.json").read_text())
chunk, context, layers, mask_value = npu["prefill_chunk"], npu["context_length"], npu["layers"], npu["mask_value"]
providers = [("QNNExecutionProvider", {"backend_path": "QnnHtp.dll"}), "CPUExecutionProvider"]
parts = [
    {
        chunk: ort.InferenceSession(str(folder / part["prefill"]), providers=providers),
        1: ort.InferenceSession(str(folder / part["decode"]), providers=providers),
        "layers": range(part["first_layer"], part["end_layer"]),
    }
    for part in npu["parts"]
]
print("running on", parts[0][1].get_providers()[0], file=sys.stderr)  # CPUExecutionProvider: no NPU was found

tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
cache = np.zeros((layers, 2, 1, npu["kv_heads"], context, npu["head_dim"]), np.float32)
filled = 0


def step(tokens: list[int], width: int) -> np.ndarray:
    """One call of every part's graph of `width`: returns the logits of `tokens` and writes their keys and values."""
    global filled
    past = context - width
    mask = np.full((1, 1, width, context), mask_value, np.float32)
    mask[..., :filled] = 0
    mask[0, 0][:, past:] = np.where(np.tri(width, dtype=bool), 0, mask_value)
    given = {"input_ids": np.array([tokens + [0] * (width - len(tokens))], np.int32)}
    positions = np.arange(filled, filled + width, dtype=np.int32)[None]
    for part in parts:
        feeds = {**given, "position_ids": positions, "attention_mask": mask}
        for i in part["layers"]:
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[i, 0, ..., :past, :], cache[i, 1, ..., :past, :]
        out, *new = part[width].run(None, feeds)
        for n, i in enumerate(part["layers"]):
            cache[i, 0, ..., filled : filled + len(tokens), :] = new[2 * n][..., : len(tokens), :]
            cache[i, 1, ..., filled : filled + len(tokens), :] = new[2 * n + 1][..., : len(tokens), :]
        given = {"hidden_states": out}
    filled += len(tokens)
    return out[0, len(tokens) - 1]


prompt = tokenizer.encode(request).ids  # apply the model's chat template (chat_template.jinja) for chat models
for start in range(0, len(prompt), chunk):
    logits = step(prompt[start : start + chunk], chunk)
for _ in range(256):
    token = int(np.argmax(logits))
    if tokenizer.id_to_token(token) == eos or filled >= context:
        break
    print(tokenizer.decode([token]), end="", flush=True)
    logits = step([token], 1)
print()
