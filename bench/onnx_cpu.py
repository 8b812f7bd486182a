"""`make bench`, bench/onnx_cpu.json: which onnxruntime-genai settings make the ONNX CPU shape fastest here.

The fixture's HF folder is built by onnxruntime-genai's model builder (through edgeport's builder wrapper, as
`edgeport convert` runs it) once per weight setting: int4 MatMulNBits in blocks of 32, 64 and 128 with int8
activations in the kernels (accuracy_level 4), blocks of 32 with float32 activations (accuracy_level 1), and 8-bit
weights. Each is then run by onnxruntime-genai directly (bench/host.py's `direct`, each run a process of its own) at
a 512-token summary prompt and 128 greedy tokens, alternated round by round; the fastest setting is run again with
the session settings that matter on CPUs that genai_config.json exposes: the thread count, and the KV cache's
past/present buffer sharing off. (Whether idle threads spin is an onnxruntime session entry that onnxruntime-genai
0.18's genai_config.json has no field for.) Parity is not measured here: `edgeport convert` measures it for the
setting it uses.
"""

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from run import fixture, write

from edgeport.source import open_source

ROUNDS = 3
PROMPT_TOKENS, NEW_TOKENS = 512, 128
WEIGHTS = {  # name -> (builder precision, extra options)
    "int4 block 32, accuracy 4": ("int4", ["block_size=32", "accuracy_level=4"]),
    "int4 block 64, accuracy 4": ("int4", ["block_size=64", "accuracy_level=4"]),
    "int4 block 128, accuracy 4": ("int4", ["block_size=128", "accuracy_level=4"]),
    "int4 block 32, accuracy 1": ("int4", ["block_size=32", "accuracy_level=1"]),
    "int8 (8-bit MatMulNBits), accuracy 4": ("int8", ["accuracy_level=4"]),
}
console = Console()


def main() -> None:
    source = open_source(str(fixture()))
    with tempfile.TemporaryDirectory() as scratch:
        folders = {
            name: build(source.path, Path(scratch) / str(i), *how) for i, (name, how) in enumerate(WEIGHTS.items())
        }
        weights = race({name: (folder, {}) for name, folder in folders.items()})
        best = max(weights["median"], key=lambda name: weights["median"][name]["decode_tps"])
        folder = folders[best]
        sessions = race(
            {
                f"{best}, as built": (folder, {}),
                f"{best}, 1 thread": (folder, {"intra_op_num_threads": 1}),
                f"{best}, past/present buffers not shared": (folder, {"past_present_share_buffer": False}),
            }
        )
        sizes = {name: sum(f.stat().st_size for f in folder.glob("*.onnx*")) for name, folder in folders.items()}
    result = {
        "what": f"SmolLM2-135M-Instruct through onnxruntime-genai's builder and generator, {PROMPT_TOKENS}-token "
        f"summary prompt, {NEW_TOKENS} greedy tokens, median of {ROUNDS} rounds, each run a process of its own, "
        "alternated",
        "weights": weights,
        "sizes_bytes": sizes,
        "fastest_weights": best,
        "sessions": sessions,
    }
    show(result)
    write("onnx_cpu", result)


def build(hf_folder: Path, out: Path, precision: str, options: list[str]) -> Path:
    command = [sys.executable, "-m", "edgeport.convert.onnx_builder", "-i", str(hf_folder), "-o", str(out)]
    command += ["-p", precision, "-e", "cpu", "-c", str(out) + "-cache", "--extra_options", "hf_token=false", *options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the builder failed for {precision} {options}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (hf_folder / name).exists():
            shutil.copy2(hf_folder / name, out / name)
    return out


def race(contenders: dict[str, tuple[Path, dict]]) -> dict:
    """Each contender's folder with its session settings, run in turn, ROUNDS times."""
    runs = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, (folder, settings) in contenders.items():
            runs[name].append(run_once(folder, settings))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    return {"runs": runs, "median": median}


def run_once(folder: Path, settings: dict) -> dict:
    config_file = folder / "genai_config.json"
    original = config_file.read_text()
    config = json.loads(original)
    for key, value in settings.items():
        if key == "past_present_share_buffer":
            config["search"][key] = value
        else:
            config["model"]["decoder"]["session_options"][key] = value
    config_file.write_text(json.dumps(config, indent=2))
    try:
        host = Path(__file__).with_name("host.py")
        command = [sys.executable, str(host), "direct", "onnx", str(folder), str(PROMPT_TOKENS), str(NEW_TOKENS)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return json.loads((folder.parent / "direct-onnx.json").read_text())
    finally:
        config_file.write_text(original)


def show(result: dict) -> None:
    for part in ("weights", "sessions"):
        table = Table(title=f"bench/onnx_cpu: {part} (median of {ROUNDS})")
        for column in ("setting", "prefill tok/s", "decode tok/s"):
            table.add_column(column, justify="right")
        for name, m in result[part]["median"].items():
            table.add_row(name, f"{m['prefill_tps']:.1f}", f"{m['decode_tps']:.1f}")
        console.print(table)


if __name__ == "__main__":
    main()
