"""Qualcomm AI Hub for the ONNX NPU shape: compile each graph of each part to a QNN context binary for the target's
device, profile it there, and run the parity prompts on the device against the source's logits, the parts' prefill
graphs one after another, each on what the previous one returned on the device.

Everything goes through the `qai_hub` client, configured by the user (`qai-hub configure --api_token ...`
writes ~/.qai_hub/client.ini). edgeport never reads, prints or stores the token.
"""

import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import qai_hub as hub

from edgeport.engines.onnx import StaticKVRunner
from edgeport.errors import EdgeportError
from edgeport.layouts import OnnxNPU
from edgeport.parity import Metric, bounds_for, judge, kl_divergence

COMPILE_OPTIONS = "--target_runtime qnn_context_binary"
NOT_CONFIGURED = (
    "Qualcomm AI Hub is not configured: run `qai-hub configure --api_token <your token>` "
    "(from https://aihub.qualcomm.com, Account > Settings) and convert again with --aihub"
)
REJECTED = (
    "Qualcomm AI Hub rejected the API token (wrong or expired): get a new one (Account > Settings) and run "
    "`qai-hub configure --api_token <your token>`"
)
ANSWER_SECONDS = 20  # the client retries a lost network for about 30 s more before it gives up


@dataclass
class AIHubResult:
    """What the manifest records of AI Hub for the NPU artifact: its jobs, the device's profile and parity."""

    device: str
    status: str  # "passed" | "failed" | "not run"
    jobs: dict | None = None  # job name -> {id, url}
    profile: dict | None = None  # graph -> latency, peak memory, layers per compute unit
    binaries: list[str] | None = None  # the QNN context binaries, relative to the artifact
    inference: dict | None = None  # the device's logits against the source's: tokens, metrics, status
    reason: str | None = None  # why it failed or did not run

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def available(device_name: str) -> str | None:
    """None when the client is configured and knows `device_name`; otherwise why AI Hub cannot be used. Waits at
    most ANSWER_SECONDS. The client's own messages can quote its configuration, so none is repeated."""
    answer: list = []
    asking = threading.Thread(target=_ask_devices, args=(device_name, answer), daemon=True)
    asking.start()
    asking.join(ANSWER_SECONDS)
    if not answer:
        return f"Qualcomm AI Hub did not answer within {ANSWER_SECONDS} s (is the network off or blocked?)"
    devices = answer[0]
    if isinstance(devices, hub.UserError):
        return REJECTED if "authenticate" in str(devices).lower() else NOT_CONFIGURED
    if isinstance(devices, Exception):  # the client wraps network failures in several types
        return f"Qualcomm AI Hub could not be reached ({type(devices).__name__})"
    if not devices:
        return f"Qualcomm AI Hub has no device named '{device_name}'"
    return None


def _ask_devices(device_name: str, answer: list) -> None:
    try:
        answer.append(hub.get_devices(name=device_name))
    except Exception as e:
        answer.append(e)


def run(artifact_dir: Path, device_name: str, reference, quantization: str, progress) -> AIHubResult:
    """Compile, profile and run the NPU graphs in `artifact_dir` on `device_name`; the binaries are downloaded
    into `artifact_dir/aihub/`. Returns what the manifest records, a failed job included."""
    result = AIHubResult(device_name, "failed", jobs={}, profile={}, binaries=[])
    try:
        _run(artifact_dir, hub.Device(device_name), reference, quantization, progress, result)
    except (EdgeportError, hub.Error, OSError) as e:  # the local artifact stands; the manifest says what happened
        result.reason = str(e) if isinstance(e, EdgeportError) else f"{type(e).__name__} talking to AI Hub"
    return result


def _run(artifact_dir: Path, device, reference, quantization: str, progress, result: AIHubResult) -> None:
    device_name = device.name
    out = artifact_dir / "aihub"
    out.mkdir()
    layout = OnnxNPU.read(artifact_dir)
    compiled = {}
    for file in [graph for part in layout.parts for graph in (part.prefill, part.decode)]:
        graph = file.removesuffix(".onnx")
        progress(f"AI Hub: compiling {graph} for {device_name}")
        with tempfile.TemporaryDirectory(prefix="edgeport-aihub-") as scratch:
            job = hub.submit_compile_job(
                model=str(upload_path(artifact_dir, graph, Path(scratch))),
                device=device,
                name=f"edgeport {graph}",
                options=COMPILE_OPTIONS,
            )
        result.jobs[f"compile_{graph}"] = _job(job)
        _wait(job, f"compiling {graph}")
        compiled[file] = job.get_target_model()
        binary = out / f"{graph}.bin"
        compiled[file].download(str(binary))
        result.binaries.append(str(binary.relative_to(artifact_dir)))

        progress(f"AI Hub: profiling {graph} on {device_name}")
        job = hub.submit_profile_job(model=compiled[file], device=device, name=f"edgeport {graph} profile")
        result.jobs[f"profile_{graph}"] = _job(job)
        _wait(job, f"profiling {graph}")
        result.profile[graph] = _profile_summary(job.download_profile())

    runner = StaticKVRunner(artifact_dir)
    width = runner.prefill_chunk
    prompts = [ids[:width] for ids in reference.inputs]  # one prefill call each, on an empty cache
    given = [np.array([p + [0] * (width - len(p))], np.int32) for p in prompts]
    for part in runner.parts:
        graph = part.part.prefill.removesuffix(".onnx")
        progress(f"AI Hub: running the parity prompts through {graph} on {device_name}")
        inputs = {}
        for x in given:
            for name, value in part.feeds(x, 0, width).items():
                inputs.setdefault(name, []).append(value)
        job = hub.submit_inference_job(
            model=compiled[part.part.prefill], device=device, inputs=inputs, name=f"edgeport parity {graph}"
        )
        result.jobs[f"inference_{graph}"] = _job(job)
        _wait(job, f"running the parity prompts through {graph}")
        outputs = job.download_output_data()
        given = outputs["logits" if part.part.end_layer == layout.layers else "output_hidden_states"]
    result.inference = _compare(given, reference.logits, [len(p) for p in prompts], quantization)
    result.status = result.inference["status"]


def upload_path(artifact_dir: Path, graph: str, scratch: Path) -> Path:
    """What AI Hub takes for one graph: the .onnx file, or for weights in external data (a part's shared weights
    file, or a graph's own .data) a folder holding exactly the .onnx and the files it names, as the client
    requires."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = artifact_dir / f"{graph}.onnx"
    proto = onnx.load(model, load_external_data=False)
    named = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    if not named:
        return model
    folder = scratch / f"{graph}.onnx"
    folder.mkdir()
    for file in (model, *(artifact_dir / name for name in sorted(named))):
        try:
            (folder / file.name).hardlink_to(file)
        except OSError:  # another file system
            shutil.copy2(file, folder / file.name)
    return folder


def _job(job) -> dict:
    return {"id": job.job_id, "url": job.url}


def _wait(job, what: str) -> None:
    status = job.wait()
    if not status.success:
        raise EdgeportError(f"AI Hub job {job.job_id} failed {what}: {status.message} (see {job.url})")


def _profile_summary(profile: dict) -> dict:
    summary = profile.get("execution_summary", {})
    units = Counter(layer.get("compute_unit", "unknown") for layer in profile.get("execution_detail", []))
    peak = summary.get("inference_memory_peak_range")
    latency_us = summary.get("estimated_inference_time")
    return {
        "latency_ms": latency_us / 1000 if isinstance(latency_us, int | float) else None,
        "peak_memory_mb": [round(v / 1e6, 1) for v in peak] if isinstance(peak, tuple | list) else None,
        "layers_per_compute_unit": dict(units),
    }


def _compare(device_logits: list, reference_logits: list, lengths: list[int], quantization: str) -> dict:
    """The device's logits against the source's on the same prompts, judged as parity judges them."""
    ref = np.concatenate([r[:n] for r, n in zip(reference_logits, lengths, strict=True)])
    got = np.concatenate([np.asarray(d)[0, :n] for d, n in zip(device_logits, lengths, strict=True)]).astype(np.float32)
    metrics = {
        "tokens": int(ref.shape[0]),
        "top1_agreement": round(float(np.mean(ref.argmax(-1) == got.argmax(-1))), 4),
        "kl_mean": round(float(np.mean(kl_divergence(ref, got))), 5),
    }
    bounds = bounds_for(quantization)
    judged = [
        Metric("top1_agreement", metrics["top1_agreement"], bounds.top1_agreement, at_least=True),
        Metric("kl_mean", metrics["kl_mean"], bounds.kl_mean),
    ]
    return {**metrics, "status": judge(metrics, judged, "Qualcomm AI Hub").status}
