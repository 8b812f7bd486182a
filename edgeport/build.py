"""Carry a plan out: the source's reference outputs once, each step through its converter, each artifact against
the stored reference, one manifest, all written into the staging folder that `edgeport.output.claim` gives."""

from pathlib import Path

from edgeport import isolated, manifest, quantization, report
from edgeport.convert import CONVERTERS, converter, missing_backend
from edgeport.engines import engine_of
from edgeport.errors import EdgeportError
from edgeport.layouts import builds_qnn_shape
from edgeport.manifest import REFERENCE, NotBuilt
from edgeport.parity import skipped
from edgeport.plan import Plan, Step
from edgeport.preflight import Work
from edgeport.source import GGUF_CAUSAL_LM_TYPES, TRACED_CAUSAL_LM_TYPES, Source
from edgeport.targets import Target


def buildable(plan: Plan, family) -> tuple[list[Step], list[NotBuilt]]:
    """The steps of `plan` that fit the target and have a converter, and why each other one is not built."""
    steps, not_built = [], []
    for step in plan.steps:
        reason = _why_not_built(step, plan, family)
        if reason:
            not_built.append(NotBuilt(step.format, step.quantization, reason))
        else:
            steps.append(step)
    return steps, not_built


def _why_not_built(step: Step, plan: Plan, family) -> str:
    """Why `step` is not built, or "" when it is."""
    if not step.fits:
        return step.verdict
    if (family.name, step.format) not in CONVERTERS:
        return f"no {step.format} converter in this version of edgeport"
    if step.format == "gguf" and plan.model_type not in GGUF_CAUSAL_LM_TYPES:
        mapped = ", ".join(GGUF_CAUSAL_LM_TYPES)
        return f"the GGUF writer does not map {plan.model_type} onto llama.cpp yet (only {mapped}); MLX converts it"
    if (
        family.name == "causal-lm"
        and step.format in ("coreml", "onnx")
        and plan.model_type not in TRACED_CAUSAL_LM_TYPES
    ):
        traced = ", ".join(TRACED_CAUSAL_LM_TYPES)
        return f"the {step.format} converter does not trace {plan.model_type} yet (only {traced}); MLX converts it"
    if family.name == "causal-lm" and (step.format, step.quantization, step.unit) == ("onnx", "fp16", "cpu"):
        return (
            "onnxruntime's CPU kernels mostly lack fp16 and onnxruntime-genai fails on such a graph (its issue 2009): "
            "use --quant fp32 for a float ONNX on a CPU"
        )
    return missing_backend(family.name, step.format) or ""


def build(
    source: Source,
    target: Target,
    plan: Plan,
    staging: Path,
    work: Work,
    aihub: bool = False,
) -> manifest.Manifest:
    """Build every step of `plan` that fits and has a converter; return the manifest written to `staging`.
    Each converter and each parity run works in a process of its own, against the source's reference outputs
    computed once (at `work.parity` level: full, fast or none) and stored in `staging`. `work` is the preflight's:
    formats this machine has no memory for are not built, parity runs it has no memory for are not checked. With
    `aihub`, the ONNX NPU graphs are also compiled, profiled and run on the target's Qualcomm AI Hub device."""
    family, parity = source.family, work.parity
    steps, not_built = buildable(plan, family)
    for step in steps:
        if step.format in work.left_out:
            not_built.append(NotBuilt(step.format, step.quantization, work.left_out[step.format]))
    buildable_steps = [s for s in steps if s.format not in work.left_out]
    if not buildable_steps:
        reasons = "; ".join(f"{n.format} {n.quantization}: {n.reason}" for n in not_built)
        raise EdgeportError(f"nothing to build for {target.name}: {reasons}")
    for step in buildable_steps:
        converter(family.name, step.format)  # a missing backend fails now, not after the first artifact
    if aihub and family.name != "causal-lm":
        raise EdgeportError("--aihub: this version sends the causal LM graphs to Qualcomm AI Hub, not Whisper's")
    if aihub and parity == "none":
        raise EdgeportError("--aihub compares the device's outputs with the source's: use --parity full or fast")
    hub_skipped = _aihub_skipped(target, buildable_steps) if aihub else None
    family.check_inputs(source)  # missing parity speech, a tokenizer that cannot run: before any work

    costs, built, stored = [], [], None
    reference = staging / REFERENCE
    planned = [
        e for e in work.estimates if e.format not in work.left_out and not (e.parity and e.format in work.unchecked)
    ]
    with report.WorkProgress(planned) as progress:
        if parity != "none":
            description = f"Running the source in transformers for the parity reference ({parity})"
            with progress.step("parity reference", description):
                engine, cost = isolated.run("parity reference", store_reference, source, parity, reference)
            stored = manifest.reference_entry(reference, staging, parity, engine)
            costs.append(cost)
        for step in buildable_steps:
            name = f"{step.format} {step.quantization}"
            with progress.step(f"convert {name}", f"Converting to {name}"):
                artifact, cost = isolated.run(
                    f"convert {name}", convert_step, source, step, target, staging / step.format
                )
            artifact.details["convert_seconds"] = cost.seconds
            costs.append(cost)
            if parity == "none" or step.format in work.unchecked:
                checked = skipped(work.unchecked.get(step.format, "skipped by --parity none"))
            else:
                with progress.step(f"parity {name}", f"Parity of {name} against the source"):
                    checked, cost = isolated.run(f"parity {name}", check_artifact, source, artifact, reference)
                checked.seconds = cost.seconds
                costs.append(cost)
            if aihub and artifact.layout.for_qnn:
                outputs = family.read_reference(reference)
                result = hub_skipped or _on_aihub(artifact, target, outputs, step, progress)
                artifact.details["aihub"] = result.to_dict()
            built.append((artifact, checked))
    result = manifest.build(source, target, plan, built, not_built, staging, stored, costs, work.estimates)
    manifest.write(result, staging)
    return result


# What each step process runs: module-level functions, as a process of its own is given them.


def store_reference(source: Source, level: str, folder: Path) -> str:
    reference = source.family.reference(source, level)
    reference.save(folder)
    return reference.engine


def convert_step(source: Source, step: Step, target: Target, dest: Path):
    return converter(source.family.name, step.format).convert(source, step, target, dest)


def check_artifact(source: Source, artifact, reference: Path):
    family = source.family
    quantized = not quantization.get(artifact.quantization, artifact.format).is_float
    runner, not_checked = engine_of(artifact.layout).parity_runner(artifact.layout, artifact.path, quantized, source)
    return family.measure(family.read_reference(reference), runner, artifact.quantization, not_checked)


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


def _on_aihub(artifact, target: Target, reference, step: Step, progress: report.WorkProgress):
    from edgeport.convert import aihub

    with progress.step("aihub", f"Qualcomm AI Hub: {target.aihub_device}") as detail:
        result = aihub.run(artifact.path, target.aihub_device, reference, step.quantization, detail)
    if result.status != "passed":
        report.err.print(f"[yellow]AI Hub: {result.reason or 'device outputs outside the parity bounds'}[/]")
    return result
