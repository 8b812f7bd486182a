"""Carry a plan out: each step through its converter, each artifact against the source, one manifest, all
written into the staging folder that `edgeport.output.claim` gives."""

import time
from pathlib import Path

from edgeport import manifest, quantization, report
from edgeport.convert import CONVERTERS, converter
from edgeport.engines import engine_of
from edgeport.errors import EdgeportError
from edgeport.layouts import builds_qnn_shape
from edgeport.manifest import NotBuilt
from edgeport.plan import Plan, Step
from edgeport.source import Source
from edgeport.targets import Target


def build(source: Source, target: Target, plan: Plan, staging: Path, aihub: bool = False) -> manifest.Manifest:
    """Build every step of `plan` that fits and has a converter; return the manifest written to `staging`.
    With `aihub`, the ONNX NPU graphs are also compiled, profiled and run on the target's Qualcomm AI Hub device."""
    family = source.family
    buildable, not_built = [], []
    for step in plan.steps:
        reason = (
            step.verdict
            if not step.fits
            else ""
            if (family.name, step.format) in CONVERTERS
            else f"no {step.format} converter in this version of edgeport"
        )
        if reason:
            not_built.append(NotBuilt(step.format, step.quantization, reason))
        else:
            buildable.append(step)
    if not buildable:
        reasons = "; ".join(f"{n.format} {n.quantization}: {n.reason}" for n in not_built)
        raise EdgeportError(f"nothing to build for {target.name}: {reasons}")
    modules = {step.format: converter(family.name, step.format) for step in buildable}  # missing backends fail now
    if aihub and family.name != "causal-lm":
        raise EdgeportError("--aihub: this version sends the causal LM graphs to Qualcomm AI Hub, not Whisper's")
    hub_skipped = _aihub_skipped(target, buildable) if aihub else None
    family.check_inputs(source)  # missing parity speech, a tokenizer that cannot run: before any work

    reference = None
    built = []
    for step in buildable:
        start = time.perf_counter()
        with report.step(f"Converting to {step.format} {step.quantization}"):
            artifact = modules[step.format].convert(source, step, target, staging / step.format)
        artifact.details["convert_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        with report.step(f"Parity of {step.format} {step.quantization} against the source") as progress:
            if reference is None:
                progress("running the source in transformers")
                reference = family.reference(source)
            progress(f"running the {step.format} artifact")
            quantized = not quantization.get(step.quantization, step.format).is_float
            runner, not_checked = engine_of(artifact.layout).parity_runner(
                artifact.layout, artifact.path, quantized, source
            )
            parity = family.measure(reference, runner, step.quantization, not_checked)
        parity.seconds = round(time.perf_counter() - start, 2)
        if aihub and artifact.layout.for_qnn:
            artifact.details["aihub"] = (hub_skipped or _on_aihub(artifact, target, reference, step)).to_dict()
        built.append((artifact, parity))
    result = manifest.build(source, target, plan, built, not_built, staging)
    manifest.write(result, staging)
    return result


def _aihub_skipped(target: Target, steps: list[Step]):
    """Checked before any work: bad --aihub input is an error; an unconfigured client only skips AI Hub."""
    from edgeport.convert import aihub

    if not target.aihub_device:
        raise EdgeportError(f"--aihub: {target.name} names no Qualcomm AI Hub device (aihub_device in its profile)")
    if not any(builds_qnn_shape(s.format, quantization.get(s.quantization, s.format)) for s in steps):
        raise EdgeportError("--aihub: nothing for an NPU in this plan (AI Hub compiles the ONNX w8a16/w4a16 shape)")
    with report.step(f"Asking Qualcomm AI Hub for {target.aihub_device} (up to {aihub.ANSWER_SECONDS} s)"):
        reason = aihub.available(target.aihub_device)
    if reason:
        report.err.print(f"[yellow]{reason}; building the local artifacts only[/]")
        return aihub.AIHubResult(device=target.aihub_device, status="not run", reason=reason)
    return None


def _on_aihub(artifact, target: Target, reference, step: Step):
    from edgeport.convert import aihub

    with report.step(f"Qualcomm AI Hub: {target.aihub_device}") as progress:
        result = aihub.run(artifact.path, target.aihub_device, reference, step.quantization, progress)
    if result.status != "passed":
        report.err.print(f"[yellow]AI Hub: {result.reason or 'device outputs outside the parity bounds'}[/]")
    return result
