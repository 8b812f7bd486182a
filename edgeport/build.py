"""Carry a plan out: each step through its converter, each artifact against the source, one manifest.

Everything is written into a staging folder beside `out` and renamed into place only when complete.
"""

import time
from pathlib import Path

from edgeport import manifest, quantization
from edgeport.convert import CONVERTERS, converter
from edgeport.errors import EdgeportError
from edgeport.files import staged_folder
from edgeport.parity import Reference, measure
from edgeport.plan import Plan
from edgeport.runtime import report
from edgeport.runtime.runners import TorchRunner, parity_runner
from edgeport.source import Source
from edgeport.targets import Target


def build(source: Source, target: Target, plan: Plan, out: Path, force: bool = False) -> dict:
    """Build every step of `plan` that fits and has a converter; return the manifest written to `out`."""
    buildable, not_built = [], []
    for step in plan.steps:
        reason = (
            step.verdict
            if not step.fits
            else ""
            if step.format in CONVERTERS
            else f"no {step.format} converter in this version of edgeport"
        )
        if reason:
            not_built.append({"format": step.format, "quantization": step.quantization, "reason": reason})
        else:
            buildable.append(step)
    if not buildable:
        reasons = "; ".join(f"{n['format']} {n['quantization']}: {n['reason']}" for n in not_built)
        raise EdgeportError(f"nothing to build for {target.name}: {reasons}")
    modules = {step.format: converter(step.format) for step in buildable}  # a missing backend fails before any work

    reference = None
    built = []
    with staged_folder(out, force=force) as staging:
        for step in buildable:
            start = time.perf_counter()
            with report.step(f"Converting to {step.format} {step.quantization}"):
                artifact = modules[step.format].convert(source, step, staging / step.format)
            artifact.details["convert_seconds"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            with report.step(f"Parity of {step.format} {step.quantization} against the source") as progress:
                if reference is None:
                    progress("running the source in transformers")
                    reference = Reference(source, TorchRunner(source))
                progress(f"running the {step.format} artifact")
                quantized = not quantization.get(step.quantization, step.format).is_float
                runner, not_checked = parity_runner(step.format, artifact.path, quantized)
                parity = measure(reference, runner, step.quantization, not_checked)
            parity.seconds = round(time.perf_counter() - start, 2)
            built.append((artifact, parity))
        result = manifest.build(source, target, plan, built, not_built, staging)
        manifest.write(result, staging)
    return result
