import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from edgeport.errors import EdgeportError
from edgeport.source import open_source, sha256_file


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def test_opens_a_folder_with_its_family_and_hashes(tiny_llama):
    source = open_source(str(tiny_llama))
    assert (source.kind, source.family.name, source.model_type) == ("hf-folder", "causal-lm", "llama")
    weights = tiny_llama / "model.safetensors"
    assert source.origin_sha256() == {"model.safetensors": sha256_file(weights)}


def test_plan_needs_only_config_json(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    source = open_source(str(tmp_path), config_only=True)
    assert source.path == tmp_path and source.config["num_hidden_layers"] == 2
    with pytest.raises(EdgeportError, match="no weights found"):
        open_source(str(tmp_path))


def test_missing_path_says_what_to_give():
    with pytest.raises(EdgeportError, match="no such file or folder"):
        open_source("./no/such/model")


def test_unknown_architecture_lists_the_supported_ones(tiny_llama, tmp_path):
    folder = copy_of(tiny_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "rwkv"}))
    with pytest.raises(EdgeportError, match=r"architecture 'rwkv' is not supported; supported: .*llama.*qwen2"):
        open_source(str(folder))


def test_truncated_safetensors_is_refused(tiny_llama, tmp_path):
    folder = copy_of(tiny_llama, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EdgeportError, match="truncated or corrupt"):
        open_source(str(folder))


def test_garbage_safetensors_is_refused(tiny_llama, tmp_path):
    folder = copy_of(tiny_llama, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(EdgeportError, match="not a valid safetensors file"):
        open_source(str(folder))


def test_pickle_is_refused_unless_allowed_and_then_read_safely(tiny_llama, tmp_path):
    folder = copy_of(tiny_llama, tmp_path)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(EdgeportError, match="--allow-pickle"):
        open_source(str(folder))

    source = open_source(str(folder), allow_pickle=True)
    assert source.path != folder and list(source.origin_sha256()) == ["pytorch_model.bin"]
    rewritten = load_file(source.path / "model.safetensors")
    assert rewritten.keys() == weights.keys()
    assert all(torch.equal(rewritten[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_gguf_becomes_a_hugging_face_folder_that_answers(fixture_gguf):
    source = open_source(str(fixture_gguf))
    assert (source.kind, source.model_type, source.name) == ("gguf", "llama", "SmolLM2-135M-Instruct")
    assert source.config["rope_theta"] == 100000.0  # mlx-lm reads the top-level key
    model = source.load_reference()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    tokenizer = source.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer)
    assert open_source(str(fixture_gguf)).path == source.path  # converted once, then reused


def test_a_cached_hub_id_opens_offline_with_its_revision(tiny_llama, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    source = open_source("tiny-org/tiny-llama")
    assert (source.kind, source.revision, source.model_type) == ("hf-hub", commit, "llama")
    assert source.ref == "tiny-org/tiny-llama" and (source.path / "model.safetensors").is_file()
    assert open_source("tiny-org/tiny-llama", config_only=True).config["num_hidden_layers"] == 2
    with pytest.raises(EdgeportError, match="is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1"):
        open_source("tiny-org/not-cached")


def test_an_mlx_quantized_source_is_planned_at_its_bits_and_dequantized_with_a_warning(tiny_llama, tmp_path):
    import mlx_lm
    from conftest import run_cli

    quantized = tmp_path / "tiny-llama-4bit"
    mlx_lm.convert(str(tiny_llama), str(quantized), quantize=True, q_bits=4, q_group_size=32)
    code, out, _ = run_cli("plan", str(quantized), "-t", "m2-air", "--json")
    plan = json.loads(out)
    assert plan["source_bits"] == 5.0 and plan["source_quantization"].startswith("MLX affine 4-bit (group 32)")
    code, out, err = run_cli("convert", str(quantized), "-t", "m2-air", "-f", "mlx", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "dequantized to float16 first, so each artifact's quantization losses add to the source's" in err
    source = open_source(str(quantized))
    assert source.quantized.dequantized and "quantization" not in source.config
    weights = load_file(source.path / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in weights.values())  # floats transformers reads as the reference
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)


def test_a_gptq_source_is_planned_at_its_bits_but_not_converted(tiny_llama, tmp_path):
    from conftest import run_cli

    folder = copy_of(tiny_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli("plan", str(folder), "-t", "m2-air", "--json")
    assert code == 0 and json.loads(out)["source_bits"] == 4.125
    code, out, err = run_cli("convert", str(folder), "-t", "m2-air", "-o", str(tmp_path / "out"))
    assert code == 3 and not (tmp_path / "out").exists()
    assert "its weights are GPTQ, 4.12 bits a weight" in err and "convert the float checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # one line, however the terminal wraps


def test_a_quantized_gguf_says_its_real_bits(fixture_gguf):
    source = open_source(str(fixture_gguf), config_only=True)
    assert source.quantized.method == "Q4_1 GGUF" and 5 < source.quantized.bits < 6  # Q4_1 blocks and wider ones
