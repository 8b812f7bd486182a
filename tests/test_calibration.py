"""The plan's speeds: rooflines, the efficiencies fitted from published measurements, and the verdict on the whole
budget."""

import json
import statistics
from dataclasses import replace

import pytest
from conftest import LLAMA_3_1_8B, run_cli
from test_plan import config_source

from edgeport import calibration, quantization, targets
from edgeport.calibration import ENGINES, Data, Device, Measurement
from edgeport.families.causal_lm import decode_roofline_tps, model_size, prefill_roofline_tps, weight_bytes
from edgeport.plan import make_plan

SMALL = {**LLAMA_3_1_8B, "num_hidden_layers": 8}  # a 2B-shaped model: the fixed cost a token weighs more on it
LLAMA_3_2_3B = {  # meta-llama/Llama-3.2-3B's config.json, the parts the plan reads
    "model_type": "llama",
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "intermediate_size": 8192,
    "tie_word_embeddings": True,
}


def test_the_fit_holds_its_error_bound_on_the_published_rows(capsys):
    """Every row of data/measurements.toml against the fit, in sample and each held out of its own fit; printed so
    that a change of data or formulas shows what it moved."""
    data = calibration.data()
    bounds = {}
    for held_out in (False, True):
        checks = calibration.check(data, held_out)
        for c in checks:
            m = c.measurement
            print(
                f"{'held out' if held_out else 'in sample':9s} {m.device:19s} {m.model:16s} {m.format:6s} {m.unit} "
                f"{m.metric:14s} measured {m.observed:8.2f} fit {c.error:+6.0%} roofline {c.roofline_error:+6.0%}"
            )
        for kind in ("decode", "prefill"):
            errors = [abs(c.error) for c in checks if c.measurement.kind == kind]
            roofline = [abs(c.roofline_error) for c in checks if c.measurement.kind == kind]
            bounds[(held_out, kind)] = (statistics.median(errors), statistics.median(roofline))
        memory = [abs(c.error) for c in checks if c.measurement.kind == "memory"]
        assert memory and max(memory) <= 0.11  # the plan's peak memory, which nothing is fitted to
    with capsys.disabled():
        print(f"\n(held out, kind) -> (median error of the fit, of the roofline): {bounds}")
    assert bounds[(False, "decode")][0] <= 0.10 and bounds[(False, "prefill")][0] <= 0.25  # in sample
    assert bounds[(True, "decode")][0] <= 0.15 and bounds[(True, "prefill")][0] <= 0.30  # each held out of its fit
    for fit, roofline in bounds.values():
        assert fit < roofline / 3  # the calibration is what makes the figures true, not the rooflines


def test_the_fit_recovers_an_engines_efficiency_and_fixed_cost():
    """Rows made from a known efficiency and fixed cost per token give them back."""
    device = Device(bandwidth_gbs=100, tflops={"npu": 20})
    data = Data((), {"phone": device}, {"small": SMALL, "large": LLAMA_3_1_8B})
    rows = []
    for model, context in (("small", 1024), ("small", 4096), ("large", 1024), ("large", 4096)):
        row = Measurement("phone", model, "onnx", "npu", "w4a16", context, 128, "decode_tps", 1.0, "synthetic")
        roofline = data.roofline(row)
        rows.append(replace(row, value=1 / (1 / (roofline * 0.6) + 0.005)))
        prefill = replace(row, metric="prefill_tps", value=0.0)
        rows.append(replace(prefill, value=0.4 * data.roofline(prefill)))
    fitted = calibration.fit(rows, data)[("onnx", "npu", None)]
    assert fitted.decode == pytest.approx(0.6, rel=1e-6)
    assert fitted.token_s == pytest.approx(0.005, rel=1e-6)
    assert fitted.prefill == pytest.approx(0.4, rel=1e-6)
    assert (fitted.rows("decode"), fitted.rows("prefill")) == (4, 4)


def test_an_engine_without_measurements_keeps_its_rooflines_and_says_so():
    data = Data((), {}, {})
    fitted = calibration.fit([], data)
    assert all(e == calibration.Efficiency() for e in fitted.values())
    assert "no measurement yet" in calibration.Efficiency().describe(ENGINES[("coreml", "npu")])


def test_an_engine_without_rows_of_a_kind_borrows_its_units_other_engines_shares_and_says_so():
    """Core ML on the Neural Engine has no published row: its shares are QNN's on the Hexagon NPU (a real NPU
    engine reaches a share of its rooflines, never all of them), said to be a guess; an engine's own rows of a
    kind are never replaced."""
    data = calibration.data()
    fitted = calibration.fit(list(data.measurements), data)
    ane, qnn = fitted[("coreml", "npu", None)], fitted[("onnx", "npu", None)]
    assert ane.borrowed == ("decode", "prefill")
    assert {o.lenders for o in ane.origins.values()} == {(ENGINES[("onnx", "npu")].name,)}
    assert (ane.decode, ane.token_s, ane.prefill) == (qnn.decode, qnn.token_s, qnn.prefill)
    assert "a guess until one is measured" in ane.describe(ENGINES[("coreml", "npu")])
    coreml_gpu = fitted[("coreml", "gpu", None)]  # its one decode row kept; prefill from the Metal GPU engines
    assert coreml_gpu.borrowed == ("prefill",) and coreml_gpu.rows("decode") == 1 and coreml_gpu.decode < 0.5
    assert 0.3 < coreml_gpu.prefill < 1
    assert not qnn.borrowed and not fitted[("mlx", "gpu", None)].borrowed
    step = make_plan(config_source(LLAMA_3_2_3B), targets.load("iphone-15-pro")).step("coreml")
    assert step.decode_tps < 0.8 * step.decode_roofline_tps and "borrowed" in step.calibration


def test_a_devices_own_rows_outrank_the_engines():
    fitted = calibration.efficiencies()
    laptop = calibration.efficiency("onnx", "npu", "snapdragon-x-elite")
    assert laptop.device == "snapdragon-x-elite" and laptop == fitted[("onnx", "npu", "snapdragon-x-elite")]
    assert calibration.efficiency("onnx", "npu", "a-device-with-no-rows") == fitted[("onnx", "npu", None)]


def test_llama_cpp_is_fitted_per_backend_where_its_rows_span_several():
    """Rows from Metal and CUDA devices made with different fixed costs a token give each backend its own back; a
    device of either with no rows of its own takes its backend's, and one with no backend the engine's."""
    devices = {
        name: Device(bandwidth, {"gpu": 20}, {"gpu": backend})
        for name, bandwidth, backend in (("mac-a", 100, "Metal"), ("mac-b", 400, "Metal"), ("card", 900, "CUDA"))
    }
    data = Data((), devices, {"small": SMALL, "large": LLAMA_3_1_8B})
    rows = []
    for device, backend_s in (("mac-a", 0.006), ("mac-b", 0.006), ("card", 0.002)):
        for model, quant in (("small", "Q4_K_M"), ("large", "Q4_K_M"), ("large", "fp16")):
            row = Measurement(device, model, "gguf", "gpu", quant, 512, 0, "decode_tps", 1.0, "synthetic")
            rows.append(replace(row, value=1 / (1 / (data.roofline(row) * 0.8) + backend_s)))
    prefill = Measurement("mac-a", "large", "gguf", "gpu", "Q4_K_M", 512, 512, "prefill_tps", 1.0, "synthetic")
    rows.append(replace(prefill, value=0.5 * data.roofline(prefill)))  # the only prefill row: a Mac's
    fitted = calibration.fit(rows, data)
    assert fitted[("gguf", "gpu", "Metal")].token_s == pytest.approx(0.006, rel=1e-6)
    assert fitted[("gguf", "gpu", "CUDA")].token_s == pytest.approx(0.002, rel=1e-6)
    # a narrower fit takes what it has no rows of from the wider one: the card its prefill from the engine's rows,
    # a Mac of its own its prefill from the Macs'
    card = fitted[("gguf", "gpu", "CUDA")]
    assert (
        card.prefill == pytest.approx(0.5)
        and card.origins["prefill"] == fitted[("gguf", "gpu", None)].origins["prefill"]
    )
    mac_b = fitted[("gguf", "gpu", "mac-b")]
    assert mac_b.device == "mac-b" and mac_b.origins["prefill"] == fitted[("gguf", "gpu", "Metal")].origins["prefill"]
    assert calibration.efficiency("gguf", "gpu", "mac-c", "Metal", fitted) == fitted[("gguf", "gpu", "Metal")]
    assert calibration.efficiency("gguf", "gpu", "mac-c", None, fitted) == fitted[("gguf", "gpu", None)]
    assert "Metal devices' own" not in fitted[("gguf", "gpu", "Metal")].describe(ENGINES[("gguf", "gpu")])
    assert "on Metal devices'" in fitted[("gguf", "gpu", "Metal")].describe(ENGINES[("gguf", "gpu")])
    # the bundled rows: a Mac plans llama.cpp with the Metal rows' fit, a GeForce laptop with the CUDA rows'
    assert "Metal devices'" in make_plan(config_source(LLAMA_3_1_8B), targets.load("m2-air")).step("gguf").calibration
    laptop = make_plan(config_source(LLAMA_3_1_8B), targets.load("rtx-4060-laptop")).step("gguf")
    assert "CUDA devices'" in laptop.calibration


def test_the_npu_plan_is_a_calibrated_share_of_its_rooflines():
    target = targets.load("snapdragon-8-elite")
    step = make_plan(config_source(LLAMA_3_1_8B), target).step("onnx")
    size, quant = model_size(LLAMA_3_1_8B), quantization.get("w4a16", "onnx")
    # the NPU shape's cache has a fixed length, so each token reads all of it; prefill runs at 16-bit throughput
    roofline = decode_roofline_tps(size, quant, ENGINES[("onnx", "npu")], target.context_length, 84.8)
    assert step.decode_roofline_tps == pytest.approx(roofline, abs=0.1)
    assert step.prefill_roofline_tps == pytest.approx(prefill_roofline_tps(size, 22.5), abs=0.1)
    assert step.decode_tps < step.decode_roofline_tps and step.prefill_tps < step.prefill_roofline_tps
    assert step.ttft_s == pytest.approx(target.budget.prompt_tokens / step.prefill_tps, rel=0.01)
    assert "ai-hub-models" in step.calibration
    # AI Hub publishes 13.05 tok/s for this model on this device
    assert step.decode_tps == pytest.approx(13.05, rel=0.25)


def test_the_snapdragon_elites_plan_llama_cpp_on_their_cores_beside_the_npu():
    """Android and Windows-on-Snapdragon apps embed llama.cpp on the Oryon cores: Q4_0 (which its Arm kernels repack
    for their int8 dot products), at the cores' FP32 throughput, calibrated with the X Elite's published figures."""
    size = model_size(LLAMA_3_2_3B)
    for name in ("snapdragon-8-elite", "snapdragon-x-elite"):
        target = targets.load(name)
        plan = make_plan(config_source(LLAMA_3_2_3B), target)
        assert [(s.format, s.unit) for s in plan.steps] == [("onnx", "npu"), ("gguf", "cpu")]
        step = plan.step("gguf")
        assert step.quantization == "Q4_0" and "llama.cpp/pull/7191" in step.calibration
        assert step.prefill_roofline_tps == pytest.approx(prefill_roofline_tps(size, target.tflops["cpu"]), abs=0.1)
    # the laptop's cores decode a 3B faster than its NPU does (AI Hub: 18.4 tok/s), as llama.cpp's users find
    laptop = make_plan(config_source(LLAMA_3_2_3B), targets.load("snapdragon-x-elite"))
    assert laptop.step("gguf").decode_tps > laptop.step("onnx").decode_tps


def test_whispers_plan_is_the_share_of_its_rtf_roofline_that_transcription_rows_give():
    """CTranslate2 has no causal LM rows: the plan's RTF is its roofline over the share the engine's transcription
    rows reach, which on the machine they were measured on is what was measured; an engine with none keeps the
    shares its causal LM rows give."""
    from edgeport.families.whisper import Whisper, whisper_size

    data = calibration.data()
    row = next(m for m in data.measurements if m.kind == "speech" and m.format == "ct2")
    size = whisper_size(data.configs[row.model])
    device = data.devices[row.device]
    ci = replace(targets.load("rtx-4060-laptop"), name="ci", bandwidth_gbs=device.bandwidth_gbs, tflops=device.tflops)
    step = Whisper().step(size, ci, "ct2", row.quantization, "cpu")
    assert step.rtf == pytest.approx(row.value, rel=1e-3)
    assert "transcription at" in calibration.efficiency("ct2", "cpu").describe(ENGINES[("ct2", "cpu")])
    speech = [c for c in calibration.check(data) if c.measurement.kind == "speech"]
    assert speech and all(c.predicted > c.roofline for c in speech)  # slower than the roofline says
    assert data.expected(row, calibration.Efficiency()) == pytest.approx(data.roofline(row))  # no rows: the roofline
    # held out, the ONNX row falls back to its engine's causal LM shares, as the plan does without the row
    onnx = next(
        c
        for c in calibration.check(data, held_out=True)
        if c.measurement.kind == "speech" and c.measurement.format == "onnx"
    )
    assert onnx.predicted != pytest.approx(onnx.roofline)


def test_the_npu_shape_is_counted_as_built():
    """w4a16 keeps the output projection at 8 bits and the embedding table at 16 (a Gather's data, quantized as an
    activation); a tied table is held twice, once each way."""
    quant = quantization.get("w4a16", "onnx")
    for config in (LLAMA_3_1_8B, LLAMA_3_2_3B):
        size = model_size(config)
        table, norms = size.head_params, size.params - size.matrix_params
        rest = size.matrix_params - table * (1 if size.tied else 2)
        expected = (rest * 4.5 + table * 8 + table * 16) / 8 + 2 * norms
        assert weight_bytes(size, quant) == pytest.approx(expected)
        assert weight_bytes(size, quantization.get("int4-block32", "onnx")) < expected
        assert weight_bytes(size, quant, active=True) == pytest.approx(
            ((size.active_matrix_params - table) * 4.5 + table * 8) / 8 + 2 * norms
        )


def test_context_sets_the_kv_cache_and_a_context_shorter_than_the_prompt_is_refused(tiny_llama):
    code, out, _ = run_cli("plan", str(tiny_llama), "-t", "m2-air", "--context", "8192", "--json")
    long = json.loads(out)
    _, out, _ = run_cli("plan", str(tiny_llama), "-t", "m2-air", "--json")
    default = json.loads(out)
    assert long["context_length"] == 8192 and default["context_length"] == 4096
    assert long["steps"][0]["kv_bytes"] == 2 * default["steps"][0]["kv_bytes"]
    code, out, err = run_cli("plan", str(tiny_llama), "-t", "m2-air", "--context", "256")
    assert code == 3 and not out
    assert "--context 256: must exceed the 512-token prompt" in err and "Traceback" not in err


def _tight_target(tmp_path, **budget) -> str:
    text = (targets._profiles() / "m2-air.toml").read_text()
    for key, value in budget.items():
        text = text.replace(f"\n{key} = ", f"\n{key} = {value}  # was ", 1)
    own = tmp_path / "tight.toml"
    own.write_text(text.replace('name = "m2-air"', 'name = "tight"'))
    return str(own)


def test_the_verdict_covers_decode_and_ttft_and_plan_exits_1_when_nothing_meets_the_budget(tmp_path):
    source = config_source(LLAMA_3_2_3B)
    met = make_plan(source, targets.load("m2-air", 24), ["mlx"], "q4").step("mlx")
    assert met.meets_budget and "decode ≈" in met.verdict and "meets 20" in met.verdict and "meets 2 s" in met.verdict
    # an 8B model fits an M2 Air but its prompt takes longer than the 2 s budget: memory alone is not the verdict
    big = make_plan(config_source(LLAMA_3_1_8B), targets.load("m2-air", 24), ["mlx"], "q4").step("mlx")
    assert big.fits and not big.meets_budget and "TTFT ≈" in big.verdict and "misses the 2 s budget" in big.verdict

    slow = targets.load(_tight_target(tmp_path, decode_tps=40), 24)
    step = make_plan(source, slow, ["mlx"], "q8").step("mlx")
    assert step.fits and not step.meets_budget
    assert f"decode ≈ {step.decode_tps:.1f} tok/s misses the 40 tok/s budget" in step.verdict
    # fewer bits read per token: the first quantization of the ladder that meets the whole budget is named
    assert "would meet the whole budget" in step.verdict

    impatient = _tight_target(tmp_path, ttft_s=0.01)
    config = tmp_path / "llama" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA_3_2_3B))
    code, out, err = run_cli("plan", str(config.parent), "-t", impatient, "--json")
    assert code == 1 and not err
    steps = json.loads(out)["steps"]  # --json still prints, with numbers
    assert all(isinstance(s["ttft_s"], float) and not s["meets_budget"] for s in steps)
    assert all("misses the 0.01 s budget" in s["verdict"] for s in steps)
    code, out, _ = run_cli("plan", str(config.parent), "-t", impatient)
    assert code == 1 and "nothing planned meets the whole budget" in out
    code, out, _ = run_cli("plan", str(config.parent), "-t", "m2-air", "--ram", "24")
    assert code == 0 and "meets the whole budget of m2-air: mlx q4" in out
