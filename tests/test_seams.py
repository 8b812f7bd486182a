"""The seams between stages: one family object, typed layouts that converters write and runners read, engines that
say whether they run here, one metric judge, and the two attention-mask conventions."""

import importlib
import inspect
import json
import math

import numpy as np
import pytest

from edgeport import layouts, targets
from edgeport.convert import CONVERTERS
from edgeport.engines import engine_of
from edgeport.engines.loop import mask_at_position, mask_new_at_end
from edgeport.errors import EdgeportError
from edgeport.families import FAMILIES, family_of
from edgeport.families.causal_lm import LMDims
from edgeport.machine import ON_MAC
from edgeport.parity import Metric, judge

NPU = layouts.OnnxNPU(
    prefill_chunk=128,
    context_length=512,
    layers=2,
    kv_heads=1,
    head_dim=8,
    vocab_size=100,
    mask_value=-100.0,
    inputs=["input_ids"],
    outputs=["logits"],
    cache="…",
    parts=[layouts.OnnxPart("prefill-01-of-01.onnx", "decode-01-of-01.onnx", 0, 2)],
)


def test_a_family_is_chosen_once_from_the_model_type():
    assert family_of("whisper").name == "whisper"
    assert family_of("llama").name == family_of("qwen3_moe").name == "causal-lm"
    for family in FAMILIES.values():
        assert family.workload in ("summarize", "transcribe")
        assert len(family.metric_cells({}, lambda m, name, spec: "—")) == len(family.metric_columns)


def test_every_converter_has_the_one_signature():
    for (family, fmt), (module, _) in CONVERTERS.items():
        assert family in FAMILIES and fmt in targets.FORMATS
        convert = importlib.import_module(module).convert
        assert list(inspect.signature(convert).parameters) == ["source", "step", "target", "dest"], module


def test_kv_dimensions_come_from_the_config_once():
    dims = LMDims.from_config(
        {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 9}
    )
    assert dims.cache_shape(32) == (3, 1, 2, 32, 16)
    whisper = FAMILIES["whisper"].dims(
        {
            "d_model": 64,
            "vocab_size": 100,
            "num_mel_bins": 80,
            "encoder_layers": 2,
            "decoder_layers": 3,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "max_source_positions": 1500,
            "max_target_positions": 448,
        }
    )
    assert whisper.cache_shape(448) == (3, 1, 4, 448, 16) and whisper.cross_shape == (3, 1, 4, 1500, 16)


def test_a_layout_written_is_read_back_and_names_its_engine(tmp_path):
    NPU.write(tmp_path)
    assert json.loads((tmp_path / "npu.json").read_text())["prefill_chunk"] == 128  # the sidecar apps read
    (tmp_path / "genai_config.json").write_text("{}")  # both markers: the NPU layout is the more specific
    found = layouts.read("causal-lm", "onnx", tmp_path)
    assert found == NPU and found.shape == "npu" and found.for_qnn
    assert found.parts == [layouts.OnnxPart("prefill-01-of-01.onnx", "decode-01-of-01.onnx", 0, 2)]  # typed again
    assert engine_of(found).__name__ == "edgeport.engines.onnx"
    (tmp_path / "npu.json").unlink()
    assert layouts.read("causal-lm", "onnx", tmp_path) == layouts.OnnxCPU()


def test_a_folder_no_converter_wrote_is_refused(tmp_path):
    with pytest.raises(EdgeportError, match="not a whisper ct2 artifact"):
        layouts.read("whisper", "ct2", tmp_path)
    (tmp_path / "npu.json").write_text('{"prefill_chunk": 128}')
    with pytest.raises(EdgeportError, match="not the onnx layout"):
        layouts.read("causal-lm", "onnx", tmp_path)


def test_each_engine_says_whether_it_runs_here():
    for layout in (NPU, layouts.MLXModel(), layouts.CT2Whisper()):
        assert engine_of(layout).unavailable_here() is None  # installed by `make install`
    coreml = engine_of(layouts.CoreMLWhisper("CPU_AND_NE", "iOS18", "state", [], [], ""))
    assert (coreml.unavailable_here() is None) == ON_MAC


def test_one_judge_for_every_metric():
    assert Metric("top1", 0.9, 0.5, at_least=True).ok and not Metric("top1", 0.4, 0.5, at_least=True).ok
    assert Metric("kl", 0.1, 0.5).ok and not Metric("kl", 0.6, 0.5).ok
    assert not Metric("ppl_delta", math.nan, 0.5).ok and not Metric("wer", None, 0.1).ok  # not measured: not met
    parity = judge({"kl": 0.6}, [Metric("kl", 0.6, 0.5)], "test")
    assert parity.status == "failed" and parity.failures == ["kl 0.6 > 0.5"] and parity.bounds == {"kl": 0.5}


def test_the_two_mask_conventions():
    # New tokens at the end of the attended window (ONNX): 2 filled, 3 new over 8 positions.
    mask = mask_new_at_end(2, 3, 8, -1.0)[0, 0]
    assert (mask[:, :2] == 0).all() and (mask[:, 2:5] == -1).all()
    assert np.array_equal(mask[:, 5:] == 0, np.tri(3, dtype=bool))
    # New tokens written at their position (Core ML): row r opens the cache up to its own token.
    mask = mask_at_position(2, 3, 8, -np.inf)[0, 0]
    assert [int((row == 0).sum()) for row in mask] == [3, 4, 5]


def test_the_token_clock_derives_its_rates_from_its_own_stream(monkeypatch):
    """TTFT, prefill and decode rates as the clock computes them, on a clock that ticks as told (no real timing)."""
    from edgeport.engines import loop

    ticks = iter([10.0, 10.5, 10.6, 10.8])  # start, then three tokens
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(ticks))
    clock = loop.TokenClock(prompt_tokens=100, start=loop.time.perf_counter())
    first, _, last = (clock.token(i) for i in range(3))
    assert first.elapsed_s == 0.5 and first.prompt_tps == 100 / 0.5 and first.generation_tps == 0.0
    assert last.generated == 3 and last.generation_tps == pytest.approx(2 / 0.3)
