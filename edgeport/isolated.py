"""One step of a conversion (a converter, the source's reference run, one artifact's parity) in its own process,
so that the memory it took is given back to the machine before the next step starts, and so that what it cost
(wall time, peak resident memory) is measured for that step alone.

Children come from a fork server that has the heavy libraries imported once, so a step starts in a fraction of a
second rather than the seconds a fresh interpreter takes to import torch. A child takes the parent's environment
and working folder as they are when it starts (the fork server's are those of its own start).
"""

import contextlib
import errno
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from edgeport import quiet
from edgeport.errors import EdgeportError
from edgeport.machine import peak_rss_bytes

PRELOAD = ["numpy", "torch", "transformers", "safetensors", "edgeport.families", "edgeport.parity"]
FULL_DISK_BYTES = 64 * 2**20  # less free than this where a step's write failed: the disk filled up
STOP_SECONDS = 10  # how long a stopped child has to end its own children before it is killed
# glibc keeps a freed block under its mmap threshold resident in its heap, and raises that threshold (up to 32 MB)
# to the largest block freed so far, so the weights of a paged model's layers, read and let go as each runs, stay.
# A fixed threshold gives every block over 4 MB back when it is freed: a paged Whisper large-v3-turbo reference
# peaks at 1.6 GB instead of 3.8. Set in the environment, it holds in the fork server and every subprocess.
GIVE_BACK_FREED = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}


def preload(*modules: str) -> None:
    """Have the fork server import `modules` too when it starts (no effect once it runs): every step that uses them
    then starts with them imported, where a fresh import of coremltools alone takes seconds."""
    PRELOAD.extend(module for module in modules if module not in PRELOAD)


@dataclass
class StepCost:
    """What one step of a conversion cost on this machine."""

    step: str
    seconds: float
    peak_rss_bytes: int  # the step's process, or the largest subprocess it ran


def run(step: str, function: Callable, *args):
    """`function(*args)` in a process of its own; returns its value and what the step cost. An error raised there is
    raised here (an EdgeportError as itself); a step killed by the system (the OOM killer) is an EdgeportError."""
    for name, value in GIVE_BACK_FREED.items():
        os.environ.setdefault(name, value)
    # The step's temporary files go in a folder of its own, removed here however the step ends: a process the OOM
    # killer ends cleans nothing up, and coremltools leaves every package it converts in the temporary folder.
    scratch = tempfile.mkdtemp(prefix="edgeport-step-")
    context = _context()
    receive, send = context.Pipe(duplex=False)
    # Nothing is ever sent on this pipe: the child sees it close when this process ends, however it ends.
    parent_gone, parent_alive = context.Pipe(duplex=False)
    child = context.Process(
        target=_child,
        args=(send, parent_gone, {**os.environ, "TMPDIR": scratch}, os.getcwd(), quiet.silenced, function, args),
        name=f"edgeport: {step}",
    )
    start = time.perf_counter()
    try:
        child.start()
        send.close()
        parent_gone.close()
        try:
            outcome, value, peak = receive.recv()
        except EOFError:  # the child ended without a word: killed
            child.join()
            raise EdgeportError(_killed(step, child.exitcode, time.perf_counter() - start)) from None
        except BaseException:  # Ctrl-C or SIGTERM here: the child ends its own children, then goes
            _stop(child)
            raise
        finally:
            receive.close()
        child.join()
        seconds = time.perf_counter() - start
        if outcome == "error" and _disk_filled(value, scratch):
            raise EdgeportError(_out_of_disk(step, seconds, value)) from value
    finally:
        parent_alive.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if outcome == "error":
        raise value
    return value, StepCost(step, round(seconds, 2), peak)


def _context():
    if sys.platform == "win32":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child(send, parent_gone, environment: dict, folder: str, silenced: bool, function: Callable, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environment)
    tempfile.tempdir = None  # read again from TMPDIR: the step's own folder
    os.chdir(folder)
    if silenced:
        quiet.silence_libraries()
    signal.signal(signal.SIGTERM, _stopped)  # unwound like Ctrl-C: a builder subprocess is ended too
    orphaned = threading.Event()
    threading.Thread(target=_stop_when_orphaned, args=(parent_gone, orphaned), daemon=True).start()
    try:
        try:
            message = ("done", function(*args))
        except BaseException as e:  # sent back whole, with the child's traceback as a note for --debug
            e.add_note("".join(traceback.format_exception(e)))
            message = ("error", e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
        send.send((*message, peak_rss_bytes(children=True)))
    except (KeyboardInterrupt, BrokenPipeError):
        pass  # stopped while answering, or the parent is gone: it says what happened itself
    finally:
        send.close()
        if orphaned.is_set():
            shutil.rmtree(tempfile.gettempdir(), ignore_errors=True)


def _stopped(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _stop_when_orphaned(parent_gone, orphaned: threading.Event) -> None:
    """Stop this step when edgeport's own process ends without stopping it (killed by SIGKILL or the OOM killer),
    rather than run on unseen into a folder nobody will rename; its temporary files go, as the parent would have
    removed them. A step stuck in a library call that does not return to Python is ended outright."""
    with contextlib.suppress(EOFError):
        parent_gone.recv()
    orphaned.set()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_SECONDS)
    shutil.rmtree(tempfile.gettempdir(), ignore_errors=True)
    os._exit(1)


def _picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return True


def _stop(child) -> None:
    if child.is_alive():
        child.terminate()
        child.join(STOP_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()


def _disk_filled(error: BaseException, scratch: str) -> bool:
    """Whether a step's error was a write that found no room: ENOSPC, or a library's own words for it (numpy's
    tofile says "Not enough free space"; its save, "requested and 0 written") while the step's files still fill
    the disk."""
    if not isinstance(error, OSError):
        return False
    return error.errno == errno.ENOSPC or shutil.disk_usage(scratch).free < FULL_DISK_BYTES


def _out_of_disk(step: str, seconds: float, error: OSError) -> str:
    return (
        f"{step} ran out of disk space after {seconds:.0f} s ({error.strerror or error}); `edgeport convert "
        f"--dry-run` shows what each step writes: free space, or set TMPDIR to a disk with room for the temporary "
        f"files ({tempfile.gettempdir()} now)"
    )


def _killed(step: str, exitcode: int | None, seconds: float) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        cause = " (the system's out-of-memory killer sends it)" if -exitcode == signal.SIGKILL else ""
        how = f"was killed by {name}{cause}"
    else:
        how = f"ended with exit code {exitcode} and no result"
    return (
        f"{step} {how} after {seconds:.0f} s; if memory ran out, `edgeport convert --dry-run` shows what each step "
        "needs here"
    )
