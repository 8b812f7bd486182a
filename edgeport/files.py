"""Files on disk: the cache (entries staged and renamed into place), JSON read with clear errors."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeport.errors import EdgeportError
from edgeport.headers import parse_json

MAX_JSON_BYTES = 64 * 2**20  # configs, manifests and bench results are kilobytes; tokenizer.json files reach 30 MB


@contextmanager
def cache_entry(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder that becomes the cache entry `dest` when the block succeeds, and is removed
    when it fails. Cache entries are written once: when a concurrent run finished the same entry first, ours is
    dropped. Staging folders of runs that died are removed here too."""
    dest = Path(dest)
    made(dest.parent)
    for leftover in dest.parent.glob(f".{dest.name}.staging-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if dest.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def made(folder: Path) -> Path:
    """`folder` in the cache, made if need be; a cache that cannot be written gets one line saying what to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeportError(
            f"the cache folder {folder} cannot be used ({e.strerror}); set EDGEPORT_CACHE to a writable folder"
        ) from e
    return folder


def cache_dir() -> Path:
    """Where converted sources are kept between runs: $EDGEPORT_CACHE, else ~/.cache/edgeport."""
    return Path(os.environ.get("EDGEPORT_CACHE", Path.home() / ".cache" / "edgeport"))


def read_json(file: Path, missing: str):
    """The parsed JSON of `file`, read as data (see `headers.parse_json`); `missing` says what to do when it is
    not there."""
    if not file.is_file():
        raise EdgeportError(f"{file.parent}: no {file.name} ({missing})")
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise EdgeportError(f"{file}: {size / 2**20:.0f} MB is too large for this kind of file; is it the right one?")
    return parse_json(file.read_bytes(), file, "it")
