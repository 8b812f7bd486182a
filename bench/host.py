"""`make bench`, bench/host.json: the fastest engine on this machine.

One `edgeport convert -t host -f onnx,gguf` output of the SmolLM2 fixture holds the ONNX int4 CPU shape and the
GGUF Q4_K_M file. At 512 and 2048 prompt tokens (summary prompts, 128 greedy tokens, the same threads), alternated
round by round, each is measured four ways, each in a process of its own (peak RSS sampled): `edgeport bench` on
the ONNX artifact, onnxruntime-genai's generator called directly on the same folder, `edgeport bench` on the GGUF
artifact, and llama.cpp (llama-cpp-python) called directly on the same file. Reported: prefill and decode tok/s,
peak memory, the runner's overhead over the engine it drives, the best edgeport decode against llama.cpp's, the
share of the plan's bandwidth roofline, and which kernels ran (onnxruntime's MatMulNBits settings, ggml's CPU
features).

`python bench/host.py direct ENGINE FOLDER PROMPT_TOKENS NEW_TOKENS` is one direct run (what the bench starts).
"""

import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from run import BIN, edgeport_bench, fixture, run, write
from sampling import sample

ROUNDS = 3
PROMPTS = (512, 2048)
NEW_TOKENS = 128
ENGINES = {  # name -> (artifact format, how it runs)
    "edgeport bench onnx": ("onnx", "edgeport"),
    "onnxruntime-genai direct": ("onnx", "direct"),
    "edgeport bench gguf": ("gguf", "edgeport"),
    "llama.cpp direct": ("gguf", "direct"),
}
console = Console()


def main() -> None:
    out = Path("/tmp/edgeport-bench-host")
    run(
        [
            str(BIN / "edgeport"),
            "convert",
            str(fixture()),
            "-t",
            "host",
            "-f",
            "onnx,gguf",
            "--out",
            str(out),
            "--force",
        ]
    )
    found = json.loads((out / "manifest.json").read_text())
    steps = {s["format"]: s for s in found["plan"]["steps"]}
    rows = {length: {name: [] for name in ENGINES} for length in PROMPTS}
    for _ in range(ROUNDS):
        for length in PROMPTS:
            for name, (fmt, how) in ENGINES.items():
                rows[length][name].append(measure(out, fmt, how, length))
    median = {
        length: {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in by.items()}
        for length, by in rows.items()
    }
    result = {
        "what": f"SmolLM2-135M-Instruct ({fixture().name}, converted by edgeport convert -t host -f onnx,gguf), "
        f"summary prompts of {' and '.join(map(str, PROMPTS))} tokens, {NEW_TOKENS} greedy tokens, median of "
        f"{ROUNDS} rounds, each engine in its own process, alternated",
        "runs": rows,
        "median": median,
        "per_prompt": {length: judge(m, steps) for length, m in median.items()},
        "kernels": kernels(out),
        "goals": {
            "best_edgeport_decode_vs_llama_cpp": ">= 1.0 (>= 1.4 where onnxruntime wins)",
            "runner_overhead": "<= 0.03",
        },
    }
    show(result)
    write("host", result)


def measure(out: Path, fmt: str, how: str, length: int) -> dict:
    """One run of one engine in a process of its own: its rates and the process's peak RSS."""
    if how == "edgeport":
        start = time.perf_counter()
        figures = edgeport_bench(out, fmt, length, NEW_TOKENS)
        seconds = time.perf_counter() - start
        return {
            "prefill_tps": figures["prefill_tps"],
            "decode_tps": figures["decode_tps"],
            "peak_memory_gb": round(max(figures["peak_memory_gb"], figures["peak_rss_gb"]), 3),
            "wall_s": round(seconds, 1),
        }
    command = [sys.executable, __file__, "direct", fmt, str(out / fmt), str(length), str(NEW_TOKENS)]
    sampled = sample(command)
    if sampled.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{sampled.stderr}")
    figures = json.loads(Path(out / f"direct-{fmt}.json").read_text())
    return {**figures, "peak_memory_gb": round(sampled.largest_rss / 1e9, 3), "wall_s": sampled.seconds}


def judge(median: dict, steps: dict) -> dict:
    """What one prompt length says: overheads, the best edgeport artifact against llama.cpp, roofline shares."""
    onnx, gguf = median["edgeport bench onnx"], median["edgeport bench gguf"]
    best = max(("onnx", onnx), ("gguf", gguf), key=lambda pair: pair[1]["decode_tps"])
    llama = median["llama.cpp direct"]["decode_tps"]
    return {
        "runner_overhead": {
            "onnx": round(1 - onnx["decode_tps"] / median["onnxruntime-genai direct"]["decode_tps"], 4),
            "gguf": round(1 - gguf["decode_tps"] / llama, 4),
        },
        "fastest_edgeport_artifact": best[0],
        "best_edgeport_decode_vs_llama_cpp": round(best[1]["decode_tps"] / llama, 3),
        "onnxruntime_vs_llama_cpp_decode": round(median["onnxruntime-genai direct"]["decode_tps"] / llama, 3),
        "decode_share_of_roofline": {
            fmt: round(median[f"edgeport bench {fmt}"]["decode_tps"] / steps[fmt]["decode_roofline_tps"], 3)
            for fmt in ("onnx", "gguf")
        },
    }


def kernels(out: Path) -> dict:
    """The kernels that ran: onnxruntime's 4-bit MatMul settings as the builder wrote them, ggml's CPU features."""
    import llama_cpp
    import onnx

    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute} if nbits else {}
    layout = json.loads((out / "gguf" / "gguf.json").read_text())
    return {
        "onnxruntime": f"com.microsoft MatMulNBits x{len(nbits)} (bits {attributes.get('bits')}, block "
        f"{attributes.get('block_size')}, accuracy_level {attributes.get('accuracy_level', 0)})",
        "ggml": f"{layout['file_type']}; {llama_cpp.llama_print_system_info().decode().strip()}",
    }


def show(result: dict) -> None:
    for length, by in result["median"].items():
        table = Table(title=f"bench/host: {length}-token prompt (median of {ROUNDS})")
        for column in ("engine", "prefill tok/s", "decode tok/s", "peak GB"):
            table.add_column(column, justify="right")
        for name, m in by.items():
            table.add_row(name, f"{m['prefill_tps']:.1f}", f"{m['decode_tps']:.1f}", f"{m['peak_memory_gb']:.2f}")
        verdict = result["per_prompt"][length]
        overhead = verdict["runner_overhead"]
        table.caption = (
            f"fastest here: {verdict['fastest_edgeport_artifact']}, "
            f"{verdict['best_edgeport_decode_vs_llama_cpp']}x llama.cpp's decode (goal ≥ 1); runner overhead "
            f"onnx {overhead['onnx']:+.1%}, gguf {overhead['gguf']:+.1%} (goal ≤ 3 %)"
        )
        console.print(table)
    console.print(f"kernels: {result['kernels']}")


def direct(fmt: str, folder: Path, prompt_tokens: int, new_tokens: int) -> None:
    """One greedy run of the engine itself on the artifact, timed as `edgeport bench` times it (the first token
    closes the prefill); its rates go to a JSON file beside the artifact."""
    from transformers import AutoTokenizer

    from edgeport.engines.gguf import BATCH, MODEL_FILE, threads
    from edgeport.texts import default_article, summary_prompt

    prompt = summary_prompt(AutoTokenizer.from_pretrained(folder), default_article(), prompt_tokens)
    if fmt == "onnx":
        import onnxruntime_genai as og

        model = og.Model(str(folder))

        def once(tokens: list[int], count: int) -> list[float]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(tokens) + count, do_sample=False)
            start, times = time.perf_counter(), []
            generator = og.Generator(model, params)
            generator.append_tokens(tokens)
            while not generator.is_done() and len(times) < count:
                generator.generate_next_token()
                generator.get_next_tokens()
                times.append(time.perf_counter() - start)
            return times

    else:
        from llama_cpp import Llama

        llama = Llama(
            str(folder / MODEL_FILE),
            n_ctx=4096,
            n_batch=BATCH,
            n_threads=threads(),
            n_threads_batch=threads(),
            use_mmap=False,
            verbose=False,
        )

        def once(tokens: list[int], count: int) -> list[float]:
            llama.reset()  # else llama-cpp-python reuses the cached prompt and skips the prefill
            start, times = time.perf_counter(), []
            for _ in llama.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
                times.append(time.perf_counter() - start)
                if len(times) == count:
                    break
            return times

    once(prompt[:16], 2)  # warm-up, as edgeport bench does
    times = once(prompt, new_tokens)
    figures = {
        "prefill_tps": round(len(prompt) / times[0], 2),
        "decode_tps": round((len(times) - 1) / (times[-1] - times[0]), 2),
    }
    (folder.parent / f"direct-{fmt}.json").write_text(json.dumps(figures))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "direct":
        direct(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
