"""`convert --aihub` against a fake `qai_hub` module: the client boundary is replaced, everything else is real.

The fake records every call, returns job objects shaped like the client's, and answers the inference job by
running the uploaded QDQ graph with onnxruntime, so the device comparison is computed for real.
"""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import qai_hub
from conftest import run_cli

from edgeport.convert import aihub

SECRET = "qaihub-secret-token-0123456789"


class FakeStatus:
    def __init__(self, success=True, message=""):
        self.success, self.message = success, message


class FakeJob:
    def __init__(self, hub, kind, model, fail=False):
        hub.count += 1
        self.job_id, self.url = f"j{kind[0]}{hub.count}", f"https://app.aihub.qualcomm.com/jobs/j{hub.count}/"
        self.model, self.fail, self.outputs = model, fail, None

    def wait(self):
        return FakeStatus(not self.fail, "compilation failed: op not supported" if self.fail else "")

    def get_target_model(self):
        return FakeTargetModel(self.model)

    def download_profile(self):
        return {
            "execution_summary": {
                "estimated_inference_time": 12345,
                "inference_memory_peak_range": (10_000_000, 20_000_000),
            },
            "execution_detail": [
                {"name": "a", "compute_unit": "NPU"},
                {"name": "b", "compute_unit": "NPU"},
                {"name": "c", "compute_unit": "CPU"},
            ],
        }

    def download_output_data(self):
        return self.outputs


class FakeTargetModel:
    def __init__(self, onnx_file):
        self.onnx_file = onnx_file

    def download(self, filename):
        with open(filename, "wb") as f:
            f.write(b"QNN context binary for " + self.onnx_file.encode())
        return filename


def fake_hub(folder: Path, configured=True, fail_compile=False, devices=("Samsung Galaxy S24 (Family)",)):
    """A stand-in for the qai_hub client that keeps what it is given under `folder` (the test's own)."""
    hub = types.SimpleNamespace(count=0, calls=[], UserError=qai_hub.UserError, Error=qai_hub.Error)

    def get_devices(name=""):
        hub.calls.append(("get_devices", name))
        if not configured:
            raise qai_hub.UserError(f"Failed to load client configuration file (api_token = {SECRET})")
        return [types.SimpleNamespace(name=d) for d in devices if d == name]

    uploaded = folder / "uploaded"
    uploaded.mkdir()

    def submit_compile_job(model, device, name, options):
        """Takes a copy of what it is given, as the client uploads it then: a graph, or a folder of a graph and
        the weights files it names."""
        hub.calls.append(("compile", model, device.name, options))
        given, kept = Path(model), uploaded / f"{hub.count}"
        kept.mkdir()
        (shutil.copytree if given.is_dir() else shutil.copy2)(given, kept / given.name)
        graph = kept / given.name / given.name if given.is_dir() else kept / given.name
        return FakeJob(hub, "compile", str(graph), fail=fail_compile)

    def submit_profile_job(model, device, name):
        hub.calls.append(("profile", model.onnx_file, device.name))
        return FakeJob(hub, "profile", model.onnx_file)

    def submit_inference_job(model, device, inputs, name):
        hub.calls.append(("inference", model.onnx_file, device.name))
        job = FakeJob(hub, "inference", model.onnx_file)
        session = ort.InferenceSession(model.onnx_file)
        count = len(next(iter(inputs.values())))
        output = session.get_outputs()[0].name  # logits, or the hidden states the next part takes
        job.outputs = {output: [session.run([output], {k: v[i] for k, v in inputs.items()})[0] for i in range(count)]}
        return job

    hub.get_devices = get_devices
    hub.submit_compile_job = submit_compile_job
    hub.submit_profile_job = submit_profile_job
    hub.submit_inference_job = submit_inference_job
    hub.Device = lambda name: types.SimpleNamespace(name=name)
    return hub


def convert(model, out, *extra, target="snapdragon-8-gen-3"):
    return run_cli("convert", str(model), "-t", target, "--out", str(out), "--aihub", "--json", *extra)


def two_part_target(tmp_path):
    """The Galaxy S24's profile with a part bound so small that each layer of a tiny model is a part of its own."""
    from edgeport.targets import _profiles

    text = (_profiles() / "snapdragon-8-gen-3.toml").read_text().replace("qnn_part_gb = 1.0", "qnn_part_gb = 1e-7")
    file = tmp_path / "two-parts.toml"
    file.write_text(text.replace('name = "snapdragon-8-gen-3"', 'name = "two-parts"'))
    return str(file)


def test_compiles_profiles_and_runs_each_graph_of_each_part_on_the_targets_device(tiny_llama, tmp_path, monkeypatch):
    hub = fake_hub(tmp_path)
    monkeypatch.setattr(aihub, "hub", hub)
    code, stdout, err = convert(tiny_llama, tmp_path / "o", target=two_part_target(tmp_path))
    assert code == 0, err
    (artifact,) = json.loads(stdout)["artifacts"]
    result = artifact["details"]["aihub"]
    assert result["status"] == "passed" and result["device"] == "Samsung Galaxy S24 (Family)"
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["get_devices", *["compile", "profile"] * 4, "inference", "inference"]
    compiles = [c for c in hub.calls if c[0] == "compile"]
    graphs = ["prefill-01-of-02", "decode-01-of-02", "prefill-02-of-02", "decode-02-of-02"]
    assert [c[1].rsplit("/", 1)[1] for c in compiles] == [f"{g}.onnx" for g in graphs]
    assert all(c[3] == "--target_runtime qnn_context_binary" for c in compiles)
    inferences = [c[1].rsplit("/", 1)[1] for c in hub.calls if c[0] == "inference"]
    assert inferences == ["prefill-01-of-02.onnx", "prefill-02-of-02.onnx"]  # the second on the first's output
    assert set(result["jobs"]) == {
        *(f"{kind}_{graph}" for graph in graphs for kind in ("compile", "profile")),
        "inference_prefill-01-of-02",
        "inference_prefill-02-of-02",
    }
    assert result["profile"]["decode-02-of-02"] == {
        "latency_ms": 12.345,
        "peak_memory_mb": [10.0, 20.0],
        "layers_per_compute_unit": {"NPU": 2, "CPU": 1},
    }
    assert result["inference"]["top1_agreement"] > 0.9 and result["inference"]["tokens"] > 10
    files = {f["path"] for f in artifact["files"]}
    assert {f"onnx/aihub/{graph}.bin" for graph in graphs} <= files  # downloaded and hashed


def test_without_a_configured_client_the_local_artifacts_are_still_built(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(aihub, "hub", fake_hub(tmp_path, configured=False))
    code, stdout, err = convert(tiny_llama, tmp_path / "o")
    assert code == 0, err
    assert "qai-hub configure --api_token" in err and SECRET not in err + stdout
    (artifact,) = json.loads(stdout)["artifacts"]
    assert artifact["details"]["aihub"]["status"] == "not run"
    assert SECRET not in (tmp_path / "o" / "manifest.json").read_text()
    assert (tmp_path / "o" / "onnx" / "prefill-01-of-01.onnx").exists()


def test_the_real_client_without_configuration_is_reported_not_raised(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing.ini"))
    assert aihub.available("Samsung Galaxy S24 (Family)") == aihub.NOT_CONFIGURED


def test_a_failed_job_is_recorded_and_the_build_kept(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(aihub, "hub", fake_hub(tmp_path, fail_compile=True))
    code, stdout, err = convert(tiny_llama, tmp_path / "o")
    assert code == 0, err
    result = json.loads(stdout)["artifacts"][0]["details"]["aihub"]
    assert result["status"] == "failed" and "op not supported" in result["reason"]
    assert "compile_prefill-01-of-01" in result["jobs"]


@pytest.mark.parametrize(
    "target, message",
    [("m2-air", "names no Qualcomm AI Hub device"), ("snapdragon-8-gen-3", "has no device named")],
)
def test_bad_aihub_requests(target, message, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(aihub, "hub", fake_hub(tmp_path, devices=()))
    code, _, err = run_cli("convert", str(tiny_llama), "-t", target, "--out", str(tmp_path / "o"), "--aihub")
    if target == "m2-air":
        assert code == 3 and message in err and not (tmp_path / "o").exists()
    else:
        assert code == 0 and message in err


def test_device_logits_outside_the_bounds_fail():
    ref = [np.eye(5, dtype=np.float32)[[0, 1, 2]] * 10]
    wrong = [np.eye(5, dtype=np.float32)[[3, 4, 3]][None] * 10]
    assert aihub._compare(wrong, ref, [3], "w8a16")["status"] == "failed"
    assert aihub._compare([ref[0][None]], ref, [3], "w8a16")["status"] == "passed"


def test_a_parts_graphs_share_one_weights_file_and_go_up_with_it(tmp_path):
    """The prefill and decode graphs of a part keep their weights in one file, each tensor once; both still run,
    and AI Hub gets each graph as a folder of the .onnx and the file it names."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from edgeport.convert.onnx import share_weights

    built, artifact, scratch = tmp_path / "built", tmp_path / "onnx", tmp_path / "scratch"
    built.mkdir(), artifact.mkdir(), scratch.mkdir()
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    for name in ("prefill", "decode", "alone"):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
            [numpy_helper.from_array(weight, "w")],
        )
        onnx.save(helper.make_model(graph), (artifact if name == "alone" else built) / f"{name}.onnx")
    share_weights(built, artifact, ["prefill.onnx", "decode.onnx"], "weights.data")
    assert (artifact / "weights.data").stat().st_size == weight.nbytes  # once, for both graphs
    x = np.ones((1, 64), np.float32)
    for name in ("prefill", "decode"):
        session = onnxruntime.InferenceSession(str(artifact / f"{name}.onnx"))
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-6)
    assert aihub.upload_path(artifact, "alone", scratch) == artifact / "alone.onnx"  # its weights inside
    folder = aihub.upload_path(artifact, "prefill", scratch)
    assert sorted(p.name for p in folder.iterdir()) == ["prefill.onnx", "weights.data"]


@pytest.fixture
def client_ini(tmp_path, monkeypatch):
    """The real qai_hub client, configured with a secret token and pointed at `url` on loopback."""

    def configure(url):
        ini = tmp_path / "client.ini"
        ini.write_text(f"[api]\napi_token = {SECRET}\napi_url = {url}\nweb_url = {url}\nverbose = False\n")
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))

    return configure


def test_a_rejected_token_is_called_rejected_and_never_shown(client_ini, capfd):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"detail": "Invalid token."}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client_ini(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert aihub.available("Samsung Galaxy S24 (Family)") == aihub.REJECTED
    finally:
        server.shutdown()
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err


def test_an_unreachable_hub_is_given_up_on_in_bounded_time(client_ini, monkeypatch, capfd):
    import socket
    import time

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client_ini(f"http://127.0.0.1:{port}")
    monkeypatch.setattr(aihub, "ANSWER_SECONDS", 2)
    start = time.monotonic()
    reason = aihub.available("Samsung Galaxy S24 (Family)")
    assert time.monotonic() - start < 5
    assert reason.startswith("Qualcomm AI Hub did not answer within 2 s") or "could not be reached" in reason
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err + reason
