"""Run edgeport's ONNX NPU shape on a Windows-on-Snapdragon laptop's Hexagon NPU.

    pip install onnxruntime-qnn tokenizers numpy
    python generate.py out/my-model-snapdragon-x-elite/onnx "Summarize: ..."

The graphs are static: prefill.onnx takes a fixed chunk of tokens, decode.onnx one token, and both read the KV
cache this script keeps (npu.json describes them). Greedy decoding, for brevity.
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
sessions = {
    w: ort.InferenceSession(str(folder / f"{g}.onnx"), providers=providers)
    for w, g in ((chunk, "prefill"), (1, "decode"))
}
print("running on", sessions[1].get_providers()[0], file=sys.stderr)  # CPUExecutionProvider means no NPU was found

tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
cache = np.zeros((layers, 2, 1, npu["kv_heads"], context, npu["head_dim"]), np.float32)
filled = 0


def step(tokens: list[int], width: int) -> np.ndarray:
    """One call of the graph of `width`: returns the logits of `tokens` and writes their keys and values."""
    global filled
    past = context - width
    mask = np.full((1, 1, width, context), mask_value, np.float32)
    mask[..., :filled] = 0
    mask[0, 0][:, past:] = np.where(np.tri(width, dtype=bool), 0, mask_value)
    feeds = {
        "input_ids": np.array([tokens + [0] * (width - len(tokens))], np.int32),
        "position_ids": np.arange(filled, filled + width, dtype=np.int32)[None],
        "attention_mask": mask,
    }
    for i in range(layers):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[i, 0, ..., :past, :], cache[i, 1, ..., :past, :]
    logits, *new = sessions[width].run(None, feeds)
    for i in range(layers):
        cache[i, 0, ..., filled : filled + len(tokens), :] = new[2 * i][..., : len(tokens), :]
        cache[i, 1, ..., filled : filled + len(tokens), :] = new[2 * i + 1][..., : len(tokens), :]
    filled += len(tokens)
    return logits[0, len(tokens) - 1]


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
