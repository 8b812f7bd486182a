"""`edgeport fit`: the sweep, quality measured (and cached) or published, the recommendation, the JSON it writes."""

import json
import re

import pytest
from conftest import make_whisper, run_cli

from edgeport import fit, targets
from edgeport.errors import EdgeportError
from edgeport.plan import Step
from edgeport.source import open_source
from edgeport.targets import Budget


def profile(tmp_path, base: str, key: str, formats: str, name: str) -> str:
    """A bundled profile with one format list replaced: a target of the test's own, as a .toml file."""
    text = (targets._profiles() / f"{base}.toml").read_text()
    text = re.sub(rf"\n{key} = \[.*?\n\]", f"\n{key} = [{formats}]", text, count=1, flags=re.S)
    (tmp_path / f"{name}.toml").write_text(text.replace(f'name = "{base}"', f'name = "{name}"'))
    return str(tmp_path / f"{name}.toml")


def gguf_only(tmp_path) -> str:
    """m2-air with llama.cpp alone: the quickest format to sweep with real conversions."""
    return profile(tmp_path, "m2-air", "formats", '{ name = "gguf", quantization = "Q4_K_M", unit = "gpu" }', "m2-air")


def step(fmt="mlx", quant="q4", decode=100.0, meets=True, misses="", peak=1.0, rtf=None) -> Step:
    return Step(
        fmt,
        quant,
        "gpu",
        int(0.5e9),
        0,
        int(peak * 1e9),
        1000.0,
        decode,
        0.5,
        True,
        "",
        None,
        rtf=rtf,
        meets_budget=meets,
        misses=misses,
    )


def variant(
    quant,
    loss,
    decode=100.0,
    meets=True,
    model="m",
    params=1,
    origin="measured",
    parity="passed",
    absolute=None,
    misses="",
):
    quality = fit.Quality(origin, loss, "", absolute=absolute, parity=parity)
    return fit.Variant(model, params, step(quant=quant, decode=decode, meets=meets, misses=misses), quality)


def test_the_sweep_holds_every_quantization_of_every_format_the_target_runs(tiny_llama):
    plan = fit.sweep(open_source(str(tiny_llama), config_only=True), targets.load("m2-air"))
    swept = [(s.format, s.quantization) for s in plan.steps]
    assert swept == [
        *[("mlx", q) for q in ("bf16", "q8", "q6", "mixed_4_6", "q4", "q4-g32", "mixed_3_6", "q3")],
        *[("coreml", q) for q in ("fp16", "int8-channel", "int4-block32", "palettize4")],
        *[("gguf", q) for q in ("fp16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0")],
    ]
    npu = fit.sweep(open_source(str(tiny_llama), config_only=True), targets.load("snapdragon-8-elite"))
    assert ("onnx", "w4a16") in [(s.format, s.quantization) for s in npu.steps]
    assert ("onnx", "int4-block32") not in [(s.format, s.quantization) for s in npu.steps if s.unit == "npu"]


def test_published_quality_is_the_scoreboards_figure_of_the_nearest_llama_cpp_type():
    q4 = fit.published("causal-lm", "q4")
    assert q4.origin == "published" and q4.like == "q4_1"
    assert q4.loss == pytest.approx(7.2571 / 6.7684 - 1, abs=1e-4)
    assert fit.published("causal-lm", "q4-g32").like == "q4_1"
    assert fit.published("causal-lm", "Q4_K_M").loss == pytest.approx(6.9593 / 6.7684 - 1, abs=1e-4)
    assert fit.published("causal-lm", "fp16").loss == 0
    assert "activations" in fit.published("causal-lm", "w4a16").note
    assert fit.published("causal-lm", "palettize4").origin == "unknown"
    assert fit.published("whisper", "int8").loss is None


def test_the_recommendation_is_the_least_loss_that_meets_the_budget_then_the_fastest():
    variants = [
        variant("bf16", 0.0, decode=10, meets=False, misses="decode ≈ 10 tok/s misses the 20 tok/s budget"),
        variant("q8", 0.001, decode=30),
        variant("q6", 0.006, decode=40),  # within LOSS_RESOLUTION of q8: as good, and faster
        variant("q4", 0.08, decode=80),
    ]
    index, reason = fit.recommend(variants)
    assert variants[index].step.quantization == "q6"
    assert reason.startswith("mlx q6: +0.6% perplexity")
    variants[1].quality.loss, variants[2].quality.loss = 0.02, 0.05  # now q8 is clearly better than q6
    index, _ = fit.recommend(variants)
    assert variants[index].step.quantization == "q8"
    variants[3].quality.loss, variants[1].quality.parity = 0.0, "failed"
    index, _ = fit.recommend(variants)
    assert variants[index].step.quantization == "q4"  # q8 fails parity now: it goes last
    index, reason = fit.recommend(variants[:2])
    assert variants[index].step.quantization == "q8"  # still recommended where nothing else meets the budget
    index, reason = fit.recommend([variants[0]])
    assert index is None and "none meets the whole budget" in reason and "misses the 20 tok/s" in reason


def test_between_models_a_larger_model_at_fewer_bits_wins_while_its_loss_stays_small():
    small = [variant("q8", 0.001, model="1b", params=1), variant("bf16", 0.0, model="1b", params=1, decode=50)]
    large = [
        variant("q4", 0.07, model="3b", params=3),
        variant("q8", 0.001, model="3b", params=3, meets=False, misses="peak misses"),
    ]
    index, reason = fit.recommend(small + large)
    assert (small + large)[index].model == "3b" and "3b mlx q4" in reason
    large[0].quality.loss = 0.3  # beyond LARGER_MODEL_LOSS: the smaller model at more bits
    index, _ = fit.recommend(small + large)
    assert (small + large)[index].model == "1b"
    for v, bits in zip(small + large, (1.1, 1.0, 0.9, 0.8), strict=True):  # measured bits per byte decide
        v.quality.absolute = bits
    index, reason = fit.recommend(small + large)
    assert (small + large)[index].model == "3b" and "bits per byte" in reason


def test_a_fit_reads_back_from_its_json_and_a_damaged_one_is_refused():
    budget = Budget(512, 2.0, 20.0, None, None, 10.0)
    result = fit.Fit("m2-air", "summarize", budget, [variant("q4", 0.05)], 0, "q4: …")
    data = json.loads(json.dumps(result.to_dict()))
    assert fit.Fit.from_dict(data, "fit.json") == result
    with pytest.raises(EdgeportError, match="not a fit result"):
        fit.Fit.from_dict({"kind": "manifest"}, "fit.json")
    data["variants"][0]["step"]["decode_tps"] = "fast"
    with pytest.raises(EdgeportError, match=r"variants\[0\].step: field decode_tps"):
        fit.Fit.from_dict(data, "fit.json")
    with pytest.raises(EdgeportError, match="task must be"):
        fit.Fit.from_dict(result.to_dict() | {"task": "dance"}, "fit.json")
    data = result.to_dict() | {"recommended": 7}
    with pytest.raises(EdgeportError, match="not a variant's index"):
        fit.Fit.from_dict(data, "fit.json")


def test_fit_on_the_command_line_from_a_config_alone(tiny_llama, tmp_path):
    code, stdout, err = run_cli("fit", str(tiny_llama), "-t", "m2-air", "--quality", "published", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["variants"]) == 17 and result["recommended"] is not None
    assert all(v["quality"]["origin"] in ("published", "unknown") for v in result["variants"])
    code, _, err = run_cli("fit", str(tiny_llama), "-t", "m2-air", "--quality", "published", "--budget-decode", "1e9")
    assert code == 1 and "none meets the whole budget" in err + _
    mine = tmp_path / "notes.json"
    mine.write_text("{}")
    code, _, err = run_cli("fit", str(tiny_llama), "-t", "m2-air", "--quality", "published", "--out", str(mine))
    assert code != 0 and "not a fit result" in err and mine.read_text() == "{}"
    whisper = make_whisper(tmp_path / "whisper")
    code, _, err = run_cli("fit", str(tiny_llama), str(whisper), "-t", "m2-air", "--quality", "published")
    assert code != 0 and "fit each kind apart" in err
    code, _, err = run_cli("fit", str(whisper), "-t", "m2-air", "--task", "summarize", "--quality", "published")
    assert code != 0 and "does not summarize" in err


def test_quality_is_measured_once_then_read_from_the_cache(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    target = targets.load(gguf_only(tmp_path))
    source = open_source(str(tiny_llama), config_only=True)
    first = fit.fit([source], target, "measured")
    assert [v.step.quantization for v in first.variants] == ["fp16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"]
    for v in first.variants:
        assert v.quality.origin == "measured", v.quality.note
        assert v.quality.top1_agreement is not None and v.quality.absolute > 0
    assert abs(first.variants[0].quality.loss) < 0.01  # fp16 of a float32 source
    assert "5 variants measured here" in first.notes[0]

    def no_measuring(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(fit, "_measure", no_measuring)
    assert len(list(fit._cache_folder(source).glob("gguf-*.json"))) == 5
    second = fit.fit([source], target, "auto")
    assert [v.quality for v in second.variants] == [v.quality for v in first.variants]
    assert second.notes == []


def test_with_no_quality_known_the_recommendation_keeps_the_most_bits():
    variants = [variant("q4", None, decode=90, origin="unknown"), variant("q8", None, decode=40, origin="unknown")]
    index, reason = fit.recommend(variants)
    assert variants[index].step.quantization == "q8" and "most bits" in reason


@pytest.mark.slow
def test_fit_of_the_fixture_measures_exactly_what_convert_measures(fixture_gguf, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    target = gguf_only(tmp_path)
    code, stdout, err = run_cli("fit", str(fixture_gguf), "-t", target, "--quality", "measured", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    by_quant = {v["step"]["quantization"]: v["quality"] for v in result["variants"]}
    assert all(q["origin"] == "measured" for q in by_quant.values())
    code, stdout, err = run_cli("convert", str(fixture_gguf), "-t", target, "--out", str(tmp_path / "out"), "--json")
    assert code == 0, err
    parity = json.loads(stdout)["artifacts"][0]["parity"]["metrics"]
    assert by_quant["Q4_K_M"]["loss"] == parity["ppl_delta"]
    assert by_quant["Q4_K_M"]["top1_agreement"] == parity["top1_agreement"]
    pick = result["variants"][result["recommended"]]
    assert pick["step"]["meets_budget"]
    assert pick["quality"]["loss"] <= min(q["loss"] for q in by_quant.values()) + fit.LOSS_RESOLUTION
    code, stdout, err = run_cli("fit", str(fixture_gguf), "-t", target, "--json")  # warm: read from the cache
    assert code == 0 and json.loads(stdout)["notes"] == [], err


def test_whisper_variants_are_measured_by_their_wer(tiny_whisper, tmp_path):
    ct2_only = profile(
        tmp_path, "host", "speech_formats", '{ name = "ct2", quantization = "int8", unit = "cpu" }', "ct2-only"
    )
    result = fit.fit([open_source(str(tiny_whisper), config_only=True)], targets.load(ct2_only), "measured")
    assert [v.step.quantization for v in result.variants] == ["fp16", "int8"]
    for v in result.variants:
        assert v.quality.origin == "measured" and v.quality.loss is not None and v.quality.absolute is not None
    assert result.task == "transcribe"


def test_fit_convert_builds_the_recommendation(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    target = gguf_only(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli("fit", str(tiny_llama), "-t", target, "--quality", "published", "--convert")
    assert code == 0, err
    pick = re.search(r"recommended: gguf (\S+):", stdout)[1]
    code, _, err = run_cli("fit", str(tiny_llama), "-t", target, "--convert", "--json")
    assert code != 0 and "drop --json" in err
    built = json.loads((tmp_path / "out" / f"{tiny_llama.name}-m2-air" / "manifest.json").read_text())
    assert [(a["format"], a["quantization"]) for a in built["artifacts"]] == [("gguf", pick)]


def test_a_variant_that_fails_to_build_is_unknown_and_tried_again_next_time(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    target = targets.load(gguf_only(tmp_path))
    source = open_source(str(tiny_llama), config_only=True)

    from edgeport import isolated

    real_run = isolated.run

    def run(step, function, *args):  # every conversion killed; the reference runs as it does
        if step.startswith("convert"):
            raise EdgeportError(f"{step}: killed by the system")
        return real_run(step, function, *args)

    monkeypatch.setattr(isolated, "run", run)
    monkeypatch.setattr(fit, "_cache_folder", lambda source: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    result = fit.fit([source], target, "measured")
    assert all(v.quality.origin == "unknown" and "killed" in v.quality.note for v in result.variants)
    assert not list((tmp_path / "cache").glob("gguf-*.json"))
