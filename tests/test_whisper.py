"""Whisper for real on a tiny model built from a config: CTranslate2 in and out, audio in, the plan, the export
wrappers and graphs against transformers, every converter, WER parity, bench and check."""

import itertools
import json
import re
import shutil
import sys

import numpy as np
import onnx
import pytest
import soundfile
import torch
from conftest import assert_weights_read_alone_are_the_programs, convert, package_path, run_cli
from ctranslate2.converters import TransformersConverter
from safetensors.torch import load_file
from transformers import WhisperForConditionalGeneration

from edgeport import quantization, targets
from edgeport.audio import SAMPLE_RATE, load_audio, parity_clips, windows
from edgeport.convert import copy_app_files, whisper_onnx
from edgeport.convert.onnx import join_graphs
from edgeport.convert.whisper_torch import CrossKV, DecoderStep, StatefulDecoder
from edgeport.engines import mlx as mlx_engine
from edgeport.engines.mlx import MLXWhisper
from edgeport.engines.onnx import WhisperONNXRunner
from edgeport.engines.reference import TorchWhisper
from edgeport.engines.whisper import start_tokens, transcribe
from edgeport.errors import EdgeportError
from edgeport.families import whisper as whisper_family
from edgeport.families.whisper import WhisperDims, whisper_size
from edgeport.layouts import MLXWhisper as MLXWhisperLayout
from edgeport.parity import BOUNDS, wer
from edgeport.plan import make_plan
from edgeport.source import open_source

TOKENS = [50257, 50362, 440, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]  # prompt, then some text


def ct2_folder(model, dest, quantization):
    TransformersConverter(str(model), copy_files=[str(model / "tokenizer.json")]).convert(
        str(dest), quantization=quantization
    )
    return dest


def reference_logits(model_folder, tokens=TOKENS):
    """transformers' own forward pass over the tokens, on the first window of the Beckett clip."""
    model = WhisperForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32).eval()
    runner = TorchWhisper(open_source(str(model_folder)), model)
    features = runner.mel(parity_clips()[1].audio)
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(features), decoder_input_ids=torch.tensor([tokens])).logits
    return model, features, logits[0].numpy()


# Sources


@pytest.mark.parametrize("quantization, tolerance", [("float16", 1e-6), ("int8", 0.02)])
def test_a_ctranslate2_folder_reads_back_the_weights_ctranslate2_wrote(quantization, tolerance, tiny_whisper, tmp_path):
    folder = ct2_folder(tiny_whisper, tmp_path / "ct2", quantization)
    source = open_source(str(folder))
    assert (source.kind, source.family.name, source.config["decoder_layers"]) == ("ct2", "whisper", 2)
    original, rebuilt = load_file(tiny_whisper / "model.safetensors"), load_file(source.path / "model.safetensors")
    assert set(rebuilt) == set(original) - {"proj_out.weight"}  # tied to the embedding
    for name, value in original.items():
        if name in rebuilt:
            expected = value.to(torch.float16).float()
            scale = expected.abs().max() if quantization == "int8" else 1
            assert torch.allclose(rebuilt[name].float(), expected, atol=tolerance * float(scale)), name


def test_a_damaged_model_bin_is_refused_with_one_line(tiny_whisper, tmp_path):
    folder = ct2_folder(tiny_whisper, tmp_path / "ct2", "float16")
    weights = folder / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EdgeportError, match=r"not a valid CTranslate2 model file \(.*truncated"):
        open_source(str(folder))
    weights.write_bytes(b"\x07\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(EdgeportError, match="binary version 7"):
        open_source(str(folder))


def test_a_ctranslate2_folder_needs_its_tokenizer(tiny_whisper, tmp_path):
    folder = ct2_folder(tiny_whisper, tmp_path / "ct2", "float16")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(EdgeportError, match=r"no tokenizer\.json"):
        open_source(str(folder))


def test_english_only_and_multilingual_prompts(tiny_whisper):
    runner = TorchWhisper(open_source(str(tiny_whisper)))
    assert runner.tokenizer.convert_ids_to_tokens(runner.prompt) == ["<|startoftranscript|>", "<|notimestamps|>"]
    multilingual = {"vocab_size": 51865}
    tokens = runner.tokenizer.convert_ids_to_tokens(start_tokens(runner.tokenizer, multilingual, "de"))
    assert tokens == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"]
    with pytest.raises(EdgeportError, match=re.escape("no <|xx|> token")):
        start_tokens(runner.tokenizer, multilingual, "xx")


# Audio


def test_audio_at_any_rate_and_channel_count_becomes_16k_mono(tmp_path):
    tone = np.sin(2 * np.pi * 440 * np.arange(44_100) / 44_100).astype(np.float32) * 0.5
    soundfile.write(tmp_path / "stereo.flac", np.stack([tone, tone], axis=1), 44_100)
    audio = load_audio(tmp_path / "stereo.flac")
    assert audio.dtype == np.float32 and abs(len(audio) - SAMPLE_RATE) <= 1
    assert abs(float(np.abs(audio).max()) - 0.5) < 0.01  # same loudness: the channels were averaged, not summed
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(int(np.argmax(spectrum)) * SAMPLE_RATE / len(audio) - 440) < 2  # the pitch survived resampling


def test_unreadable_or_empty_audio_is_one_clear_error(tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(EdgeportError, match="cannot read it as audio"):
        load_audio(tmp_path / "text.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(EdgeportError, match="no audio samples"):
        load_audio(tmp_path / "empty.wav")


def test_long_audio_is_cut_at_quiet_moments_and_nothing_is_dropped():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(70 * SAMPLE_RATE).astype(np.float32) * 0.1
    quiet = slice(int(27.0 * SAMPLE_RATE), int(27.5 * SAMPLE_RATE))
    audio[quiet] = 0
    spans = windows(audio)
    assert spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous: nothing dropped
    assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in spans)
    assert quiet.start <= spans[0][1] < quiet.stop  # the first cut falls in the silence


def test_wer_is_scored_after_whisper_normalization():
    assert wer("Ever tried. Ever failed.", "ever tried, ever failed") == 0
    assert wer(["the cat sat down", "fail better"], ["the cat sat up", "fail better"]) == pytest.approx(1 / 6)


# Plan


def test_the_plan_counts_whisper_parameters_from_the_config(tiny_whisper):
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    size = whisper_size(model.config.to_dict())
    assert size.params == sum(p.numel() for p in model.parameters())  # the tied output projection counted once


def test_the_plan_uses_the_targets_speech_formats(tiny_whisper):
    source = open_source(str(tiny_whisper), config_only=True)
    plan = make_plan(source, targets.load("m2-air"))
    assert [(s.format, s.quantization, s.unit) for s in plan.steps] == [
        ("coreml", "fp16", "npu"),
        ("mlx", "fp16", "gpu"),
    ]
    assert all(s.rtf and s.fits for s in plan.steps) and plan.family == "whisper"
    with pytest.raises(EdgeportError, match="runs Whisper as onnx"):
        make_plan(source, targets.load("snapdragon-8-gen-3"), formats=["mlx"])


# The export wrappers and graphs against transformers


def test_the_export_wrappers_compute_what_transformers_does(tiny_whisper):
    model, features, expected = reference_logits(tiny_whisper)
    with torch.no_grad():
        cross_key, cross_value = CrossKV(model)(torch.from_numpy(features))
        layers, heads, head_dim = 2, 4, 16
        step = DecoderStep(model)
        past = torch.zeros(layers, 1, heads, 0, head_dim)
        keys, values, logits = past, past, []
        for chunk in (TOKENS[:5], TOKENS[5:6], TOKENS[6:]):  # a prompt, then a token, then several
            n, width = keys.shape[3], len(chunk)
            mask = torch.zeros(1, 1, width, n + width)
            mask[..., n:] = torch.triu(torch.full((width, width), -1e4), 1)
            out, new_key, new_value = step(
                torch.tensor([chunk]), torch.arange(n, n + width)[None], mask, keys, values, cross_key, cross_value
            )
            keys, values = torch.cat([keys, new_key], dim=3), torch.cat([values, new_value], dim=3)
            logits.append(out[0])
        assert np.allclose(torch.cat(logits).numpy(), expected, atol=1e-4)

        stateful = StatefulDecoder(model, WhisperDims.from_config(model.config.to_dict()).cache_shape(448))
        stateful.keyCache.zero_(), stateful.valueCache.zero_()
        for i, token in enumerate(TOKENS):
            mask = torch.full((1, 1, 1, 448), float("-inf"))
            mask[..., : i + 1] = 0
            out = stateful(torch.tensor([[token]]), torch.tensor([i]), mask, cross_key, cross_value)
            assert np.allclose(out[0, 0].numpy(), expected[i], atol=2e-2)  # its cache is fp16, as on the device


@pytest.mark.parametrize("static", [False, True])
def test_the_float_onnx_graphs_compute_what_transformers_does(static, tiny_whisper, tmp_path, monkeypatch):
    monkeypatch.setattr(whisper_family, "SPAN_PARAMS", 1)  # a span per encoder layer, each read on its own
    reads = []
    paged = whisper_onnx.paged
    monkeypatch.setattr(whisper_onnx, "paged", lambda *a, only, **k: reads.append(only) or paged(*a, only=only, **k))
    _, features, expected = reference_logits(tiny_whisper)
    graphs = whisper_onnx.export(open_source(str(tiny_whisper)), tmp_path, static=static)
    spans = [(0, 1), (1, 2), (2, 2)]
    assert graphs.units["encoder"] == [f"encoder-layers-{first}-{end}.onnx" for first, end in spans]
    assert graphs.units["decoder"] == ["decoder-embedding.onnx", "decoder-layers.onnx", "decoder-head.onnx"]
    layers = [f"model.encoder.layers.{i}" for i in range(2)]
    for (first, end), only in zip(spans, reads[:3], strict=True):  # each unit read only its own blocks
        assert [block for block in layers if only(block)] == layers[first:end]
        assert only("model.encoder.conv1") == (first == 0) and only("model.decoder.layers.0") == (first == 2)
    embedding, decoder_layers, head = reads[3:]
    assert [embedding("model.decoder.embed_tokens"), decoder_layers("model.decoder.layers.1"), head("proj_out")] == [
        True,
        True,
        False,  # the table, read as the embedding
    ]
    assert not any(read(block) for read in reads[3:] for block in layers)
    for graph in ("encoder", "decoder"):
        join_graphs([tmp_path / unit for unit in graphs.units[graph]], tmp_path / f"{graph}.onnx")
    copy_app_files(tiny_whisper, tmp_path)
    runner = WhisperONNXRunner(tmp_path)
    runner.begin(runner.encode(features))
    logits = [runner.step(TOKENS[:3])] + [runner.step([t]) for t in TOKENS[3:]]
    assert np.allclose(np.stack(logits), expected[2:], atol=1e-3)


def test_int8_reads_the_float_weights_once_to_onnxruntimes_own_bytes(tiny_whisper, tmp_path, monkeypatch):
    exported, theirs, ours = tmp_path / "float", tmp_path / "theirs", tmp_path / "ours"
    for folder in (exported, theirs, ours):
        folder.mkdir()
    graphs = whisper_onnx.export(open_source(str(tiny_whisper)), exported, static=False)
    names = [*graphs.units["encoder"], *graphs.units["decoder"]]
    int8 = quantization.get("int8", "onnx")
    for graph in names:
        whisper_onnx.quantize_dynamic(
            exported / graph,
            theirs / graph,
            weight_type=whisper_onnx.QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
            use_external_data_format=True,
        )
    loads = []
    load = onnx.load_external_data_for_model
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a: loads.append(1) or load(*a))
    for graph in names:
        whisper_onnx._cpu_precision(exported / graph, ours / graph, int8)
    assert len(loads) == len(names)  # each graph's weights read once
    for name in [file for graph in names for file in (graph, f"{graph}.data")]:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes()
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [*names, *(f"{graph}.data" for graph in names), "whisper.json"]
    )


# Converters, parity, bench and check


@pytest.fixture(scope="module")
def host_output(tiny_whisper, tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper") / "host"
    return out, convert(tiny_whisper, out, "host")


def test_host_gets_ctranslate2_and_onnx_int8_judged_by_wer(host_output, tiny_whisper):
    out, result = host_output
    assert [(a["format"], a["quantization"]) for a in result["artifacts"]] == [("ct2", "int8"), ("onnx", "int8")]
    assert result["source"]["family"] == "whisper" and result["plan"]["family"] == "whisper"
    for artifact in result["artifacts"]:
        parity = artifact["parity"]
        assert parity["bounds"] == {"wer_delta": BOUNDS["int8"].wer_delta}
        metrics = parity["metrics"]
        assert metrics["clips"] == ["two_cities.wav", "beckett.wav"] and metrics["audio_s"] > 50
        assert metrics["wer_delta"] == pytest.approx(metrics["wer_artifact"] - metrics["wer_source"], abs=1e-3)
        assert parity["status"] == ("passed" if metrics["wer_delta"] <= BOUNDS["int8"].wer_delta else "failed")
        assert parity["not_checked"] == []
    onnx_artifact = result["artifacts"][1]
    folder = out / onnx_artifact["path"]
    decoder = onnx.load(folder / "decoder.onnx")
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in decoder.graph.node}
    for graph in ("encoder", "decoder"):  # each graph's units joined, its weights in one file, as readable as it
        assert sorted(p.name for p in folder.glob(f"{graph}*")) == [f"{graph}.onnx", f"{graph}.onnx.data"]
        assert (folder / f"{graph}.onnx.data").stat().st_mode == (folder / f"{graph}.onnx").stat().st_mode


def test_faster_whisper_runs_the_ctranslate2_artifact(host_output):
    from faster_whisper import WhisperModel

    out, _ = host_output
    segments, info = WhisperModel(str(out / "ct2"), device="cpu", compute_type="int8").transcribe(
        parity_clips()[1].audio, language="en", beam_size=1
    )
    list(segments)
    assert info.duration == pytest.approx(10.0, abs=0.1)


def test_ctranslate2_transcribes_the_same_with_its_weights_unpacked_as_parity_loads_them(host_output):
    """CTranslate2 reads CT2_PACKED_GEMM once per process: each way in a process of its own."""
    import subprocess

    out, result = host_output
    (ct2,) = [a for a in result["artifacts"] if a["format"] == "ct2"]
    assert ct2["parity"]["method"].endswith("weights unpacked)")
    script = (
        "import sys; from edgeport.audio import parity_clips; from edgeport.engines.ct2 import CT2Whisper; "
        "from edgeport.engines.whisper import transcribe; "
        "runner = CT2Whisper(__import__('pathlib').Path(sys.argv[1]), packed=sys.argv[2] == 'packed'); "
        "print(runner.engine); print(transcribe(runner, parity_clips()[0].audio).text)"
    )
    command = [sys.executable, "-c", script, str(out / "ct2")]
    packed, unpacked = (
        subprocess.run([*command, way], capture_output=True, text=True, check=True).stdout.split("\n", 1)
        for way in ("packed", "unpacked")
    )
    assert unpacked[0].endswith("weights unpacked)") and not packed[0].endswith("unpacked)")
    assert packed[1] == unpacked[1] and len(packed[1]) > 20


def test_bench_transcribes_and_check_judges_rtf_and_wer(host_output, tmp_path):
    out, _ = host_output
    reference = tmp_path / "beckett.txt"
    reference.write_text(parity_clips()[1].reference)
    audio = package_path("moonshine_voice", "assets/beckett.wav")
    code, stdout, err = run_cli(
        "bench", str(out), "--audio", str(audio), "--reference", str(reference), "--runs", "1", "--json"
    )
    assert code == 0, err
    bench = json.loads(stdout)
    (result,) = bench["results"]
    assert (bench["workload"], bench["format"]) == ("transcribe", "ct2")  # the fast engine off a Mac
    assert result["windows"] == 1 and result["audio_s"] == pytest.approx(10.0, abs=0.1)
    assert result["rtf"] == pytest.approx(result["wall_s"] / result["audio_s"], rel=1e-3)
    assert result["wer"] >= 0 and result["tokens"] >= 1
    code, stdout, _ = run_cli("check", str(out), "--target", "host", "--json")
    verdict = json.loads(stdout)
    lines = {line["budget"]: line for line in verdict["lines"]}
    assert set(lines) == {"real-time factor", "WER", "peak memory"}
    assert lines["WER"]["status"] == ("met" if result["wer"] <= 0.1 else "missed")
    assert code == (0 if verdict["met"] else 1)


def test_bench_refuses_summarization_options_for_whisper(host_output):
    out, _ = host_output
    code, _, err = run_cli("bench", str(out), "--prompt-tokens", "64")
    assert code == 3 and "Whisper takes --audio" in err


@pytest.fixture(scope="module")
def mac_output(tiny_whisper, tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper") / "m2-air"
    return out, convert(tiny_whisper, out, "m2-air")


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML runs the packages themselves")
def test_m2_air_gets_core_ml_encoder_and_stateful_decoder_checked_by_weights(mac_output):
    out, result = mac_output
    coreml = result["artifacts"][0]
    assert (coreml["format"], coreml["quantization"]) == ("coreml", "fp16")
    details = coreml["details"]
    assert details["compute_units"] == "CPU_AND_NE" and details["kv_cache"] == "state"
    (decoder,) = details["decoder"]["functions"].values()
    assert [s["shape"] for s in decoder["states"]] == [[2, 1, 4, 448, 16]] * 2
    (encoder,) = details["encoder"]["functions"].values()
    assert [o["name"] for o in encoder["outputs"]] == ["cross_key", "cross_value"]
    assert coreml["parity"]["not_checked"][0].startswith("Core ML prediction needs macOS")
    assert "weights read back" in coreml["parity"]["method"]
    code, _, err = run_cli("bench", str(out), "--format", "coreml")
    assert code == 3 and "needs macOS" in err


def test_plain_fp16_packages_are_read_from_their_weight_files_as_their_programs_hold_them(mac_output, tmp_path):
    out, _ = mac_output
    for package in ("encoder.mlpackage", "decoder.mlpackage"):
        assert_weights_read_alone_are_the_programs(out / "coreml" / package, tmp_path / package)


def test_m2_air_gets_an_mlx_whisper_folder(mac_output):
    import mlx_whisper

    out, result = mac_output
    mlx = result["artifacts"][1]
    assert (mlx["format"], mlx["quantization"]) == ("mlx", "fp16")
    config = json.loads((out / "mlx" / "config.json").read_text())
    assert (config["n_text_layer"], config["n_audio_state"]) == (2, 64)
    # greedy only: on random weights every window fails the fallback's checks, and sampling at rising temperatures
    # takes from half a minute to over ten on MLX's CPU build, however the draws fall
    audio = parity_clips()[1].audio
    text = mlx_whisper.transcribe(audio, path_or_hf_repo=str(out / "mlx"), fp16=False, temperature=0.0)["text"]
    assert isinstance(text, str)  # mlx-whisper itself loads and runs the artifact


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac parity runs the MLX artifact itself")
@pytest.mark.parametrize("quant", ["q4", "fp16"])
def test_mlx_whisper_parity_off_a_mac_computes_what_mlx_whisper_computes(quant, tiny_whisper, tmp_path):
    """Off a Mac parity reads the MLX artifact's weights back into transformers: mlx-whisper's own model, on MLX's
    quantized kernels, gives the same logits, so the names, the convolutions' axes and the computed positions are
    read back as mlx-whisper reads them."""
    out = tmp_path / quant
    result = convert(tiny_whisper, out, "m2-air", "-f", "mlx", "--quant", quant, "--allow-parity-fail")
    (artifact,) = result["artifacts"]
    assert "run in the source's architecture in transformers" in artifact["parity"]["not_checked"][0]
    source = open_source(str(tiny_whisper))
    features = TorchWhisper(source).mel(parity_clips()[1].audio)
    read_back, _ = mlx_engine.parity_runner(MLXWhisperLayout(), out / "mlx", quant != "fp16", source)
    logits = []
    for runner in (MLXWhisper(out / "mlx"), read_back):
        runner.begin(runner.encode(features))
        logits.append(runner.step(TOKENS))
    assert np.allclose(logits[0], logits[1], atol=3e-3), np.abs(logits[0] - logits[1]).max()


def test_mlx_weights_written_an_array_at_a_time_read_back_as_mlxs_own_file(tmp_path):
    """The MLX Whisper file is written an array at a time (MLX's writer computes every array first): what MLX and
    the safetensors library read back is what mx.save_safetensors would have written, for each dtype an artifact
    holds, a transposed (non-contiguous) array and a lazy one alike."""
    import mlx.core as mx
    from safetensors import safe_open

    from edgeport.convert.whisper_mlx import save_an_array_at_a_time

    packed, scales, biases = mx.quantize(mx.random.normal((8, 64)), group_size=32, bits=8)
    arrays = {
        "conv": mx.random.normal((3, 5)).astype(mx.float16).transpose(1, 0),
        "embedding": mx.random.normal((4, 64)).astype(mx.bfloat16),
        "positions": mx.arange(7).astype(mx.float32) * 2,
        "heads": mx.array([[1, 3], [2, 5]], dtype=mx.int64),
        "packed": packed,
        "scales": scales,
        "biases": biases,
    }
    mx.save_safetensors(str(tmp_path / "mlx.safetensors"), arrays)
    save_an_array_at_a_time(tmp_path / "ours.safetensors", dict(arrays))
    theirs, ours = mx.load(str(tmp_path / "mlx.safetensors")), mx.load(str(tmp_path / "ours.safetensors"))
    assert ours.keys() == theirs.keys() == arrays.keys()
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype and mx.array_equal(ours[name], array).item(), name
    with safe_open(tmp_path / "ours.safetensors", "numpy") as read:
        assert read.metadata() == {"format": "mlx"}
        np.testing.assert_array_equal(read.get_tensor("positions"), np.arange(7) * 2)


@pytest.fixture(scope="module")
def snapdragon_output(tiny_whisper, tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper") / "snapdragon"
    return out, convert(tiny_whisper, out, "snapdragon-8-gen-3", "--allow-parity-fail")


def test_snapdragon_gets_static_qdq_graphs(snapdragon_output, tiny_whisper, tmp_path):
    out, result = snapdragon_output
    (artifact,) = result["artifacts"]
    assert (artifact["quantization"], artifact["details"]["shape"]) == ("w8a16", "npu")
    assert artifact["parity"]["not_checked"][0].startswith("QNN execution provider not available")
    for graph in ("encoder", "decoder"):
        model = onnx.load(out / "onnx" / f"{graph}.onnx")
        dims = [d.dim_value for i in model.graph.input for d in i.type.tensor_type.shape.dim]
        assert all(d > 0 for d in dims)  # every shape static
        kinds = {
            onnx.helper.tensor_dtype_to_np_dtype(i.data_type)
            for i in model.graph.initializer
            if i.name.endswith("_zero_point")
        }
        assert {np.dtype("uint16"), np.dtype("uint8")} <= kinds  # 16-bit activations, 8-bit weights
    code, _, err = run_cli(
        "convert", str(tiny_whisper), "-t", "snapdragon-8-elite", "--quant", "w4a16", "-o", str(tmp_path / "w4")
    )
    assert code == 3 and "use --quant w8a16" in err and not (tmp_path / "w4").exists()


def test_aihub_is_refused_for_whisper(tiny_whisper, tmp_path):
    code, _, err = run_cli(
        "convert", str(tiny_whisper), "-t", "snapdragon-8-gen-3", "--aihub", "-o", str(tmp_path / "x")
    )
    assert code == 3 and "not Whisper's" in err


def test_missing_parity_clips_fail_before_any_work(tiny_whisper, tmp_path, monkeypatch):
    monkeypatch.setattr("edgeport.audio.CLIP_PACKAGE", "no_such_clip_package")
    code, _, err = run_cli("convert", str(tiny_whisper), "-t", "host", "-o", str(tmp_path / "x"))
    assert code == 3 and "moonshine-voice" in err and not (tmp_path / "x").exists()


def test_onnx_fp16_for_a_cpu_and_what_it_refuses(tiny_whisper, tmp_path):
    result = convert(tiny_whisper, tmp_path / "fp16", "host", "-f", "onnx", "--quant", "fp16", "--allow-parity-fail")
    (artifact,) = result["artifacts"]
    assert (artifact["quantization"], artifact["details"]["shape"]) == ("fp16", "cpu")
    decoder = onnx.load(tmp_path / "fp16" / "onnx" / "decoder.onnx")
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in decoder.graph.initializer if len(i.dims) == 2}
    assert kinds == {np.dtype("float16")}
    inputs = {i.name: i.type.tensor_type.elem_type for i in decoder.graph.input}
    assert inputs["attention_mask"] == onnx.TensorProto.FLOAT  # the app's side stays float32
    code, _, err = run_cli(
        "convert", str(tiny_whisper), "-t", "host", "-f", "onnx", "--quant", "int4-block32", "-o", str(tmp_path / "x")
    )
    assert code == 3 and "fp16 or int8" in err and not (tmp_path / "x").exists()


def test_the_windows_on_snapdragon_example_transcribes_as_edgeport_does(snapdragon_output):
    import subprocess
    from pathlib import Path

    out, _ = snapdragon_output
    audio = package_path("moonshine_voice", "assets/beckett.wav")
    example = Path(__file__).parents[1] / "examples" / "windows-on-snapdragon" / "transcribe.py"
    done = subprocess.run([sys.executable, str(example), str(out / "onnx"), str(audio)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "running on CPUExecutionProvider" in done.stderr  # no NPU here
    runner = WhisperONNXRunner(out / "onnx")
    assert done.stdout.strip() == transcribe(runner, load_audio(audio)).text


def test_parity_holds_one_of_the_two_graphs_at_a_time_and_transcribes_as_with_both(snapdragon_output):
    from edgeport.engines import onnx as onnx_engine
    from edgeport.layouts import read

    out, _ = snapdragon_output
    runner, _ = onnx_engine.parity_runner(read("whisper", "onnx", out / "onnx"), out / "onnx", True, None)
    opened, open_graph = [], runner._open

    def open_alone(graph):
        opened.append((graph, runner.decoder is None))
        return open_graph(graph)

    runner._open = open_alone
    audio = load_audio(package_path("moonshine_voice", "assets/two_cities.wav"))  # two windows
    assert transcribe(runner, audio).text == transcribe(WhisperONNXRunner(out / "onnx"), audio).text
    assert opened == [("encoder", True), ("decoder", True)] * 2 and runner.encoder is None


def test_an_iphone_gets_8_bit_whisper(tiny_whisper, tmp_path):
    result = convert(tiny_whisper, tmp_path / "iphone", "iphone-15-pro", "--allow-parity-fail")
    coreml, mlx = result["artifacts"]
    assert (coreml["quantization"], mlx["quantization"]) == ("int8-channel", "q8")
    # every projection and the embedding 8-bit; the two convolutions and the position table stay fp16
    assert coreml["details"]["encoder"]["weight_matrices_by_storage"]["const fp16"] == 3
    assert set(coreml["details"]["decoder"]["weight_matrices_by_storage"]) == {"constexpr_blockwise_shift_scale"}
    for package in ("encoder.mlpackage", "decoder.mlpackage"):
        assert_weights_read_alone_are_the_programs(tmp_path / "iphone" / "coreml" / package, tmp_path / package)
    assert json.loads((tmp_path / "iphone" / "mlx" / "config.json").read_text())["quantization"]["bits"] == 8


def test_a_relative_source_path_converts_to_ctranslate2(tiny_whisper, tmp_path, monkeypatch):
    """CTranslate2's converter takes the files to copy by name, found in the model folder, whatever the cwd."""
    shutil.copytree(tiny_whisper, tmp_path / "models" / "tw")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("convert", "models/tw", "-t", "host", "-f", "ct2", "--out", "out/tw")
    assert code == 0, err
    assert (tmp_path / "out" / "tw" / "ct2" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def multilingual_whisper(tmp_path_factory):
    from conftest import make_whisper

    return make_whisper(tmp_path_factory.mktemp("ml") / "tiny-multilingual", vocab_size=51865)


def test_a_multilingual_model_detects_the_language_of_each_window(multilingual_whisper):
    """As Whisper does: one decoder step from <|startoftranscript|>, the most likely language token wins."""
    from edgeport.engines.reference import TorchWhisper
    from edgeport.engines.whisper import transcribe

    runner = TorchWhisper(open_source(str(multilingual_whisper)))
    clip = parity_clips()[1].audio
    detected = transcribe(runner, clip).languages
    assert len(detected) == len(windows(clip)) and set(detected) <= set(runner.languages)
    encoded = runner.encode(runner.mel(clip[: 30 * SAMPLE_RATE]))
    runner.begin(encoded)
    logits = runner.step(runner.prompt[:1])
    assert detected[0] == max(runner.languages, key=lambda code: logits[runner.languages[code]])

    runner.use_language("fr")
    assert runner.tokenizer.convert_tokens_to_ids("<|fr|>") in runner.prompt
    assert transcribe(runner, clip).languages == []  # given, not detected
    runner.use_language(None, "translate")
    assert runner.tokenizer.convert_tokens_to_ids("<|translate|>") in runner.prompt_for(encoded)
    with pytest.raises(EdgeportError, match="--language xx: the model knows"):
        runner.use_language("xx")


def test_an_english_only_model_neither_detects_nor_translates(tiny_whisper):
    from edgeport.engines.reference import TorchWhisper

    runner = TorchWhisper(open_source(str(tiny_whisper)))
    assert not runner.multilingual and runner.prompt_for(None) == runner.prompt
    with pytest.raises(EdgeportError, match="needs a multilingual Whisper model"):
        runner.use_language(None, "translate")


def test_bench_records_the_detected_language(multilingual_whisper, tmp_path):
    out = tmp_path / "o"
    convert(multilingual_whisper, out, "host", "-f", "onnx", "--allow-parity-fail")
    code, stdout, err = run_cli("bench", str(out), "-f", "onnx", "-r", "1", "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)["results"]
    assert row["detected_languages"] and row["language"] in row["detected_languages"] and row["task"] == "transcribe"
