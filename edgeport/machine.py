"""The machine at hand: what it is (so `check` knows whether figures speak for a target), what the process has
used, and the one platform fact every engine's availability rests on."""

import contextlib
import ctypes
import gc
import os
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@contextlib.contextmanager
def blocks_over(size: int):
    """glibc allocating every block of `size` bytes or more apart from its heap (mmap) while the block runs, so that
    each is handed back to the system when freed. Tracing Whisper large-v3-turbo's encoder frees its 3.8 MB
    activations into a heap that then stays 0.8 GB larger than the model (the step's mmap threshold,
    edgeport.isolated.GIVE_BACK_FREED, is 4 MB: lower throughout, every step would pay a system call for each such
    block). A no-op where mallopt is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    before = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 * 1024))  # or glibc's initial one
    mallopt(_M_MMAP_THRESHOLD, size)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, before)


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now, as memory pressure would; contents are unchanged


def page_out_checkpoints() -> None:
    """Hand back the pages of memory-mapped safetensors files that reading weights made resident.

    transformers maps each safetensors file and keeps it mapped while any of its tensors lives, so every page a
    weight was read from stays counted in this process until the end: the whole source by the last layer. Those
    pages are clean copies of the file; paging them out changes nothing a later read sees (it reads the file again).
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(start, end - start, _MADV_PAGEOUT)  # an older kernel refuses it: nothing is lost
