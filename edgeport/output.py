"""The output folder of a conversion: claimed for one run, written beside it, renamed into place at the end.

What this guarantees, whatever the input and however the run ends (error, Ctrl-C, SIGTERM, SIGHUP):
- an output is never the source, never holds it and never lies inside it;
- an existing folder is replaced only with --force, and only when edgeport wrote it: it has a manifest and holds
  nothing but the files that manifest lists (and the bench result beside it);
- a second run aimed at the same folder is refused while the first holds it (a lock beside the folder);
- the destination is either as it was before or complete: the work happens in `.NAME.staging-PID`, removed on any
  failure, and staging folders that dead runs left behind are removed by the next run.
"""

import errno
import fcntl
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeport import manifest
from edgeport.errors import EdgeportError

BESIDE_ARTIFACTS = (manifest.FILENAME, "bench.json")  # what edgeport writes in an output besides the artifacts
LOW_DISK_BYTES = 256 * 2**20  # a failed write with less free than this is reported as a full disk
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def claim(dest: Path, *, force: bool, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """Claim `dest` for this run and yield an empty staging folder beside it, which replaces `dest` when the block
    ends without an error. Everything that can refuse the run is checked before anything is written."""
    dest = Path(dest)
    refuse_overlap(dest, sources)
    if dest.is_symlink():
        raise EdgeportError(f"{dest} is a symbolic link: give the real folder as --out, or another name")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeportError(f"--out {dest}: cannot make its folder {dest.parent} ({e.strerror})") from e
    with _lock(dest):
        _remove_stale(dest)
        if dest.exists():
            if not force:
                raise EdgeportError(f"{dest} already exists: pass --force to replace it, or choose another --out")
            refuse_unless_ours(dest)
        staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
        try:
            staging.mkdir()
            yield staging
            _swap(staging, dest)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            _raise_if_disk_full(e, dest)
            raise


def refuse_overlap(dest: Path, sources: Iterable[Path]) -> None:
    """Refuse an output that is, holds or lies inside one of `sources` (the user's model files and folders)."""
    where = Path(dest).resolve()
    for source in sources:
        source = Path(source).resolve()
        if where == source or where in source.parents:
            raise EdgeportError(f"--out {dest} holds the source {source}: choose an output folder outside it")
        if source in where.parents:
            raise EdgeportError(f"--out {dest} lies inside the source {source}: choose an output folder outside it")


def refuse_unless_ours(dest: Path) -> None:
    """--force replaces only what edgeport wrote: a folder with a manifest, holding only the files it lists."""
    if not dest.is_dir():
        raise EdgeportError(f"{dest} is a file, not an edgeport output: --force replaces only edgeport outputs")
    if not (dest / manifest.FILENAME).is_file():
        raise EdgeportError(
            f"{dest} has no {manifest.FILENAME}, so edgeport did not write it: --force replaces only edgeport "
            "outputs; choose another --out"
        )
    try:
        listed = manifest.listed_files(manifest.read(dest)) | set(BESIDE_ARTIFACTS)
    except EdgeportError as e:
        raise EdgeportError(f"--force replaces only edgeport outputs, and {e}") from e
    foreign = sorted(
        str(f.relative_to(dest)) for f in dest.rglob("*") if not f.is_dir() and str(f.relative_to(dest)) not in listed
    )
    if foreign:
        raise EdgeportError(
            f"{dest} holds {len(foreign)} file(s) edgeport did not write ({', '.join(foreign[:3])}): move them out, "
            "or choose another --out"
        )


@contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """An exclusive lock on `.NAME.lock` beside `dest`, refused at once when another run holds it."""
    lock = dest.parent / f".{dest.name}.lock"
    fd = None
    try:
        while fd is None:
            fd = _open_lock(lock, dest)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                fd = None
                raise EdgeportError(
                    f"{dest}: another edgeport run (pid {holder}) is writing it; wait for it to end or choose "
                    "another --out"
                ) from None
            if not _same_file(lock, fd):  # its holder removed it between our open and our lock: take a new one
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)


def _open_lock(lock: Path, dest: Path) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise EdgeportError(f"--out {dest}: cannot write in {dest.parent} ({e.strerror})") from e


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_stale(dest: Path) -> None:
    """Staging folders beside `dest` can only be left by runs that died: this run holds the lock."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(staging|old)-\d+")
    for leftover in dest.parent.iterdir():
        match = pattern.fullmatch(leftover.name)
        if not match or not leftover.is_dir() or leftover.is_symlink():
            continue
        if match[1] == "old" and not dest.exists():
            leftover.rename(dest)  # a run died between moving the old output aside and moving the new one in
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _swap(staging: Path, dest: Path) -> None:
    """Move `staging` into place; the old output is removed only after. No stop signal lands in between."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _raise_if_disk_full(error: BaseException, dest: Path) -> None:
    """Libraries report a full disk in their own words ("Unable to write N bytes"): name it plainly."""
    if not isinstance(error, Exception):
        return
    free = shutil.disk_usage(dest.parent).free
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or free < LOW_DISK_BYTES:
        raise EdgeportError(
            f"the disk holding {dest.parent} is full ({free / 2**20:.0f} MB free): free some space or choose another "
            f"--out; nothing was written ({type(error).__name__}: {str(error)[:160]})"
        ) from error
