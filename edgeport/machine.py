"""The machine at hand: what it is (so `check` knows whether figures speak for a target), what the process has
used, and the one platform fact every engine's availability rests on."""

import contextlib
import ctypes
import gc
import platform
import sys

ON_MAC = sys.platform == "darwin"  # Core ML prediction, MLX on Metal


CPU_ARCHS = ("arm64", "x86_64")


def cpu_arch() -> str:
    """This machine's instruction set, named as the target profiles name it."""
    found = platform.machine()
    return {"aarch64": "arm64", "AMD64": "x86_64", "amd64": "x86_64"}.get(found, found)


def machine() -> dict:
    """What the figures were measured on, so `check` knows whether they speak for a target."""
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu_name(), "node": platform.node()}


def cpu_name() -> str:
    if ON_MAC:
        import subprocess

        return subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def peak_rss_bytes(children: bool = False) -> int:
    """The most resident memory this process has held; with `children`, the largest of it and of every child
    process it has waited for (a converter's builder subprocess)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    peak = max(resource.getrusage(w).ru_maxrss for w in who)
    return peak if ON_MAC else peak * 1024  # macOS reports bytes, Linux KiB


def release_freed_memory() -> None:
    """Free what is no longer reachable and hand the heap memory this process has freed back to the system, so that
    a step that builds one unit after another holds one unit at a time. A model torch has exported sits in reference
    cycles until the collector runs (an 8B model's 2.1 GB embedding table stayed through its own calibration
    and quantization); allocations under glibc's mmap threshold (edgeport.isolated.GIVE_BACK_FREED), protobuf's and
    onnxruntime's many small ones, stay in its heap when freed. malloc_trim is glibc's (a no-op on macOS)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
