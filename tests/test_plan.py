import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from edgeport import quantization, targets
from edgeport.errors import EdgeportError
from edgeport.families.causal_lm import model_size
from edgeport.plan import GB, make_plan
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


# One real config per family (the sizes from each model's public config.json on the Hub), with the published
# parameter total and, for mixtures of experts, the published active count (in billions). `embedded` says whether
# the publisher's active count includes the input embedding, of which a decoded token reads one row (ours does not).
FAMILIES = {
    "llama": (
        "meta-llama/Llama-3.1-8B",
        8.03,
        None,
        False,
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "mistral": (
        "mistralai/Mistral-7B-v0.3",
        7.25,
        None,
        False,
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32768,
            "sliding_window": None,
        },
    ),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1", 46.7, 12.9, True, MIXTRAL),
    "qwen2": (
        "Qwen/Qwen2.5-7B",
        7.62,
        None,
        False,
        {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
        },
    ),
    "qwen2_moe": (
        "Qwen/Qwen1.5-MoE-A2.7B",
        14.3,
        2.7,
        True,
        {
            "model_type": "qwen2_moe",
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    ),
    "qwen3": (
        "Qwen/Qwen3-8B",
        8.19,
        None,
        False,
        {
            "model_type": "qwen3",
            "hidden_size": 4096,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 12288,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    ),
    "qwen3_moe": (
        "Qwen/Qwen3-30B-A3B",
        30.5,
        3.3,
        True,
        {
            "model_type": "qwen3_moe",
            "hidden_size": 2048,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    ),
    "phi3": (
        "microsoft/Phi-3.5-mini-instruct",
        3.82,
        None,
        False,
        {
            "model_type": "phi3",
            "hidden_size": 3072,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 8192,
            "vocab_size": 32064,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
        },
    ),
    "gemma": (
        "google/gemma-7b",
        8.54,
        None,
        False,
        {
            "model_type": "gemma",
            "hidden_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": 256,
            "intermediate_size": 24576,
            "vocab_size": 256000,
        },
    ),
    "gemma2": (
        "google/gemma-2-9b",
        9.24,
        None,
        False,
        {
            "model_type": "gemma2",
            "hidden_size": 3584,
            "num_hidden_layers": 42,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "intermediate_size": 14336,
            "vocab_size": 256000,
            "sliding_window": 4096,
        },
    ),
    # the multimodal wrapper: its text part is planned (Google: 3.88B of the 4.3B; the rest is the vision tower)
    "gemma3": (
        "google/gemma-3-4b-it",
        3.88,
        None,
        False,
        {
            "model_type": "gemma3",
            "text_config": {
                "model_type": "gemma3_text",
                "hidden_size": 2560,
                "num_hidden_layers": 34,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "intermediate_size": 10240,
                "vocab_size": 262208,
                "sliding_window": 1024,
            },
            "vision_config": {"model_type": "siglip_vision_model"},
        },
    ),
    "gemma3_text": (
        "google/gemma-3-1b-it",
        1.0,
        None,
        False,
        {
            "model_type": "gemma3_text",
            "hidden_size": 1152,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "intermediate_size": 6912,
            "vocab_size": 262144,
            "sliding_window": 512,
        },
    ),
    "deepseek_v2": (
        "deepseek-ai/DeepSeek-V2-Lite",
        15.7,
        2.4,
        False,
        {
            "model_type": "deepseek_v2",
            "hidden_size": 2048,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "vocab_size": 102400,
        },
    ),
    "deepseek_v3": (
        "deepseek-ai/DeepSeek-V3",
        671,
        37,
        False,
        {
            "model_type": "deepseek_v3",
            "hidden_size": 7168,
            "num_hidden_layers": 61,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "n_routed_experts": 256,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "first_k_dense_replace": 3,
            "kv_lora_rank": 512,
            "q_lora_rank": 1536,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "vocab_size": 129280,
        },
    ),
    "granite": (
        "ibm-granite/granite-3.1-8b-instruct",
        8.17,
        None,
        False,
        {
            "model_type": "granite",
            "hidden_size": 4096,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 12800,
            "vocab_size": 49155,
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": (
        "allenai/OLMo-2-1124-7B",
        7.30,
        None,
        False,
        {
            "model_type": "olmo2",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 11008,
            "vocab_size": 100352,
            "tie_word_embeddings": False,
        },
    ),
    "smollm3": (
        "HuggingFaceTB/SmolLM3-3B",
        3.08,
        None,
        False,
        {
            "model_type": "smollm3",
            "hidden_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "intermediate_size": 11008,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
        },
    ),
    "gpt_oss": (
        "openai/gpt-oss-20b",
        20.9,
        3.6,
        False,
        {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "num_hidden_layers": 24,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "intermediate_size": 2880,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "vocab_size": 201088,
            "sliding_window": 128,
            "tie_word_embeddings": False,
        },
    ),
}


def config_source(config: dict) -> Source:
    return Source(ref=config["model_type"], kind="hf-folder", config=config)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_parameter_count_from_config_matches_the_model(fixture, request):
    folder = request.getfixturevalue(fixture)
    config = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    assert model_size(config).params == total  # transformers' own model, built on the meta device, is counted


def test_known_models_have_their_published_sizes():
    assert model_size(LLAMA_8B).params / 1e9 == pytest.approx(8.03, abs=0.01)
    mixtral = model_size(MIXTRAL)
    assert mixtral.params / 1e9 == pytest.approx(46.7, abs=0.1)
    # Mixtral's published 12.9B active includes the 0.13B input embedding, of which decoding reads one row
    assert mixtral.active_params / 1e9 == pytest.approx(12.9 - 0.13, abs=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_counted_as_published(family):
    model, total, active, embedded, config = FAMILIES[family]
    size = model_size(config)
    assert size.params / 1e9 == pytest.approx(total, rel=0.01), model
    if active:
        embedding = size.head_params if embedded else 0
        assert (size.active_params + embedding) / 1e9 == pytest.approx(active, rel=0.025), model  # 2.4 of 2.45
    plan = make_plan(config_source(config), targets.load("m4-max", 128), ["mlx"], "q4")
    assert plan.params == size.params and plan.step("mlx").weight_bytes > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_counts_are_those_of_the_model_transformers_builds(family):
    """The sums in causal_lm hold for transformers' own modeling code: the model it builds from the config on the
    meta device (no memory) has exactly as many parameters, and the routed experts a token does not read are
    exactly the difference between all and active."""
    import torch
    from transformers import AutoConfig

    config = FAMILIES[family][-1]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields).get_text_config())
    named = dict(model.named_parameters())
    size = model_size(config)
    assert size.params == sum(p.numel() for p in named.values())
    text = model.config
    experts = sum(p.numel() for n, p in named.items() if ".experts." in n)
    total = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    total = total or getattr(text, "n_routed_experts", None)
    idle = experts * (1 - text.num_experts_per_tok / total) if experts else 0
    embedding = 0 if text.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    assert size.active_params == pytest.approx(size.params - embedding - idle, abs=1)


def test_kv_caches_as_engines_keep_them():
    """Sliding-window layers hold only their window; multi-head latent attention holds its compressed vector."""
    gemma3 = model_size(FAMILIES["gemma3"][-1])
    assert gemma3.kv_values(4096) == 4096 * 2 * 4 * 256 * (34 - 29) + 1024 * 2 * 4 * 256 * 29  # 5 of 34 global
    assert gemma3.kv_values(512) == 512 * 2 * 4 * 256 * 34
    deepseek = model_size(FAMILIES["deepseek_v3"][-1])
    assert deepseek.kv_values(1) == 61 * (512 + 64)
    assert model_size(LLAMA_8B).kv_values(1) == 2 * 32 * 8 * 128


def test_a_family_only_mlx_converts_is_planned_for_every_format_and_built_as_mlx_only():
    from edgeport.build import buildable
    from edgeport.families import family_of

    config = FAMILIES["deepseek_v2"][-1]
    plan = make_plan(config_source(config), targets.load("m4-max", 128))
    steps, not_built = buildable(plan, family_of(config["model_type"]))
    assert [s.format for s in steps] == ["mlx"]
    assert [n.format for n in not_built] == ["coreml", "gguf"]
    assert "does not trace deepseek_v2 yet" in not_built[0].reason and "MLX converts it" in not_built[0].reason
    assert "GGUF writer does not map deepseek_v2" in not_built[1].reason and "MLX converts it" in not_built[1].reason


def test_moe_memory_counts_every_expert_and_decode_reads_only_the_routed_ones():
    target = targets.load("m4-max", ram_gb=128)
    routed = make_plan(config_source(MIXTRAL), target, ["mlx"], "q4").step("mlx")
    every_expert = make_plan(config_source({**MIXTRAL, "num_experts_per_tok": 8}), target, ["mlx"], "q4").step("mlx")
    assert routed.weight_bytes == every_expert.weight_bytes  # all 46.7B weights are held either way
    assert routed.weight_bytes / 1e9 == pytest.approx(46.7 * 4.5 / 8, rel=0.02)
    assert routed.decode_tps / every_expert.decode_tps == pytest.approx(46.7 / 12.9, rel=0.05)


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
    # the encoder is compute-bound: the Neural Engine's 15.8 TOPS beat the GPU's 3.6 (prefill_tps: encoder frames/s)
    assert coreml.prefill_tps > mlx.prefill_tps


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


GEMMA_3_27B = {  # google/gemma-3-27b-it's config.json, its text part: 27B at 4 bits on an 8 GB card
    "model_type": "gemma3_text",
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "vocab_size": 262208,
    "sliding_window": 1024,
    "query_pre_attn_scalar": 168,
}


def test_a_discrete_gpu_is_planned_as_llama_cpps_split_of_layers():
    """Gemma-3-27B at Q4_K_M (about 16 GB of weights): on an 8 GB RTX 4060 laptop, llama.cpp's n_gpu_layers puts what
    fits in the GPU's usable memory and the rest in RAM; on a 24 GB RTX 4090 every layer goes to the GPU."""
    laptop = make_plan(config_source(GEMMA_3_27B), targets.load("rtx-4060-laptop", 32)).step("gguf")
    desktop = make_plan(config_source(GEMMA_3_27B), targets.load("rtx-4090-desktop")).step("gguf")
    assert 0 < laptop.gpu_layers < 62 and desktop.gpu_layers == 62
    assert laptop.vram_bytes <= 8 * 0.9 * GB and desktop.vram_bytes <= 24 * 0.9 * GB
    assert laptop.peak_bytes + laptop.vram_bytes == pytest.approx(laptop.weight_bytes + laptop.kv_bytes, rel=0.1)
    assert f"n_gpu_layers={laptop.gpu_layers} of 62" in laptop.verdict and "all would need" in laptop.verdict
    # Each token reads most of the model from RAM at a third of the GPU's bandwidth: the laptop is several times
    # slower, and its speed sits between all on the CPU and all on the GPU.
    assert laptop.decode_tps * 4 < desktop.decode_tps
    cpu_only = 89.6e9 / (laptop.weight_bytes + laptop.kv_bytes)
    assert laptop.decode_roofline_tps > cpu_only
    assert laptop.fits and not laptop.meets_budget and "misses the 10 tok/s budget" in laptop.verdict
    # 16 GB of RAM cannot hold the part the GPU does not
    small = make_plan(config_source(GEMMA_3_27B), targets.load("rtx-4060-laptop", 16)).step("gguf")
    assert not small.fits and small.gpu_layers == laptop.gpu_layers


def test_the_split_gives_more_layers_and_speed_to_more_vram():
    from dataclasses import replace

    laptop = targets.load("rtx-4060-laptop", 32)
    steps = [
        make_plan(config_source(GEMMA_3_27B), replace(laptop, vram_gb=vram)).step("gguf") for vram in (4, 8, 12, 16)
    ]
    assert [s.gpu_layers for s in steps] == sorted(s.gpu_layers for s in steps)
    assert [s.decode_tps for s in steps] == sorted(s.decode_tps for s in steps)
    assert len({s.gpu_layers for s in steps}) == 4
    # a prompt copies the layers left in RAM over PCIe once per 512-token batch: fewer left, a shorter TTFT
    assert [s.ttft_s for s in steps] == sorted((s.ttft_s for s in steps), reverse=True)
    prefill_alone = laptop.budget.prompt_tokens / steps[0].prefill_tps
    copy = (62 - steps[0].gpu_layers) * steps[0].weight_bytes / 62 / (laptop.pcie_gbs * GB)
    assert steps[0].ttft_s - prefill_alone == pytest.approx(copy, rel=0.1)
    eight_b = make_plan(config_source(LLAMA_8B), laptop).step("gguf")
    assert eight_b.gpu_layers == 32 and eight_b.meets_budget  # 8B at 4 bits fits the 8 GB card whole


def test_a_profile_with_half_a_gpu_is_refused(tmp_path):
    text = (targets._profiles() / "rtx-4060-laptop.toml").read_text().replace("vram_bandwidth_gbs = 272\n", "")
    (tmp_path / "gpu.toml").write_text(text)
    with pytest.raises(EdgeportError, match="needs all of vram_gb, vram_bandwidth_gbs and pcie_gbs"):
        targets.load(str(tmp_path / "gpu.toml"))


def test_the_peak_counts_the_engines_own_runtime_where_it_was_measured():
    from conftest import LLAMA_3_1_8B

    from edgeport.calibration import ENGINES
    from edgeport.families.causal_lm import memory

    size, quant = model_size(LLAMA_3_1_8B), quantization.get("Q4_K_M", "gguf")
    on_cpu = memory(size, quant, ENGINES[("gguf", "cpu")], 4096)
    on_gpu = memory(size, quant, ENGINES[("gguf", "gpu")], 4096)  # not measured yet: nothing added
    assert on_cpu[:2] == on_gpu[:2] and on_cpu[2] - on_gpu[2] == ENGINES[("gguf", "cpu")].runtime_bytes > 0
