"""The memory and time of a command and every process it starts, sampled every 20 ms (for `make bench…`)."""

import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Sampled:
    seconds: float
    largest_rss: int  # bytes: the most any one process of the tree held at once
    total_rss: int  # bytes: the most the whole tree held at once
    returncode: int
    stderr: str


def sample(command: list[str]) -> Sampled:
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    largest = total = 0
    while process.poll() is None:
        try:
            sizes = [p.memory_info().rss for p in (process, *process.children(recursive=True))]
            largest, total = max(largest, *sizes), max(total, sum(sizes))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    return Sampled(round(time.perf_counter() - start, 2), largest, total, process.returncode, process.stderr.read())
