import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from edgeport import targets
from edgeport.errors import EdgeportError
from edgeport.families.causal_lm import model_size
from edgeport.plan import make_plan
from edgeport.source import Source

LLAMA_8B = {  # Llama-3.1-8B's config.json, the numbers that matter
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
MIXTRAL = {  # Mixtral-8x7B: 8 experts, 2 routed per token
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def config_source(config: dict) -> Source:
    return Source(ref=config["model_type"], kind="hf-folder", config=config)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_parameter_count_from_config_matches_the_model(fixture, request):
    folder = request.getfixturevalue(fixture)
    config = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    total = sum(p.numel() for p in model.parameters())
    assert model_size(config).params == total - biases  # qwen2's attention biases are a rounding error


def test_known_models_have_their_published_sizes():
    assert model_size(LLAMA_8B).params / 1e9 == pytest.approx(8.03, abs=0.01)
    mixtral = model_size(MIXTRAL)
    assert mixtral.params / 1e9 == pytest.approx(46.7, abs=0.1)
    # Mixtral's published 12.9B active includes the 0.13B input embedding, of which decoding reads one row
    assert mixtral.active_params / 1e9 == pytest.approx(12.9 - 0.13, abs=0.05)


def test_moe_memory_counts_every_expert_and_decode_reads_only_the_routed_ones():
    target = targets.load("m4-max", ram_gb=128)
    routed = make_plan(config_source(MIXTRAL), target, ["mlx"], "q4").step("mlx")
    every_expert = make_plan(config_source({**MIXTRAL, "num_experts_per_tok": 8}), target, ["mlx"], "q4").step("mlx")
    assert routed.weight_bytes == every_expert.weight_bytes  # all 46.7B weights are held either way
    assert routed.weight_bytes / 1e9 == pytest.approx(46.7 * 4.5 / 8, rel=0.02)
    assert routed.decode_tps / every_expert.decode_tps == pytest.approx(46.7 / 12.9, rel=0.05)
    qwen_moe = {**MIXTRAL, "model_type": "qwen2_moe", "num_experts": 8, "num_local_experts": None}
    assert make_plan(config_source(qwen_moe), target, ["mlx"], "q4").step("mlx").weight_bytes == routed.weight_bytes


def test_a_model_too_big_gets_the_largest_quantization_that_fits():
    target = targets.load("m2-air", ram_gb=8)  # 5.3 GB for an app
    step = make_plan(config_source(LLAMA_8B), target, ["mlx"], "fp16").step("mlx")
    # 4-bit weights (4.5 GB) + a 4k-token KV cache (0.5 GB) + prefill activations just overflow 5.3 GB
    assert not step.fits and step.largest_fitting == "q3"
    assert "does not fit" in step.verdict and "q3 would fit" in step.verdict
    assert make_plan(config_source(LLAMA_8B), targets.load("m2-air", ram_gb=16), ["mlx"], "q4").step("mlx").fits
    assert make_plan(config_source(LLAMA_8B), targets.load("m2-air", ram_gb=24), ["mlx"], "q8").step("mlx").fits


def test_decode_roofline_follows_bandwidth():
    m2 = make_plan(config_source(LLAMA_8B), targets.load("m2-air"), ["mlx"]).step("mlx")
    m4 = make_plan(config_source(LLAMA_8B), targets.load("m4-max"), ["mlx"], "q4").step("mlx")
    assert m4.decode_roofline_tps / m2.decode_roofline_tps == pytest.approx(546 / 100, rel=0.01)
    assert 15 < m2.decode_tps < 30  # 100 GB/s over about 4.5 GB of 4-bit weights


def test_bad_choices_are_explained():
    with pytest.raises(EdgeportError, match="--quant q7: not available for mlx, coreml"):
        make_plan(config_source(LLAMA_8B), targets.load("m2-air"), None, "q7")
    with pytest.raises(EdgeportError, match="m2-air runs mlx, coreml"):
        make_plan(config_source(LLAMA_8B), targets.load("m2-air"), ["onnx"])


def test_whisper_large_v3_is_planned_per_window_of_speech():
    config = AutoConfig.for_model(
        "whisper",
        vocab_size=51866,
        num_mel_bins=128,
        d_model=1280,
        encoder_layers=32,
        decoder_layers=32,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
    ).to_dict()
    plan = make_plan(Source(ref="whisper-large-v3", kind="hf-folder", config=config), targets.load("m2-air"))
    assert plan.params == pytest.approx(1_543_490_560, rel=1e-6)  # what transformers counts for large-v3
    coreml, mlx = plan.steps
    assert coreml.weight_bytes == pytest.approx(2 * plan.params, rel=0.01)  # fp16
    assert coreml.kv_bytes == 2 * 32 * (448 + 1500) * 1280 * 2  # self and cross caches, fp16
    assert mlx.rtf > coreml.rtf  # the encoder is compute-bound: the Neural Engine's 15.8 TOPS beat the GPU's 3.6


def test_tiny_model_sizes_are_consistent(tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    size = model_size(config)
    assert size.active_params == size.params - config["vocab_size"] * config["hidden_size"]  # one embedding row read


def test_the_mixed_recipe_count_is_closed_form():
    """A config's layer count costs the plan nothing: the count matches mlx-lm's per-layer rule without a loop."""
    from edgeport.families.causal_lm import mixed_recipe_layers

    for layers in range(300):
        per_layer = sum(
            1 for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        )
        assert mixed_recipe_layers(layers) == per_layer
