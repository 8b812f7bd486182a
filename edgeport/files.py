"""Files on disk: outputs staged and renamed into place, the cache, JSON read with clear errors."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeport.errors import EdgeportError


@contextmanager
def staged_folder(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `dest`, on any failure it is removed.

    An interrupted run (Ctrl-C included) therefore leaves no half-written `dest`, and an existing
    `dest` is only replaced with `force`.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise EdgeportError(f"{dest} already exists: pass --force to replace it, or choose another --out")
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def cache_dir() -> Path:
    """Where converted sources are kept between runs: $EDGEPORT_CACHE, else ~/.cache/edgeport."""
    return Path(os.environ.get("EDGEPORT_CACHE", Path.home() / ".cache" / "edgeport"))


def read_json(file: Path, missing: str):
    """The parsed JSON of `file`; `missing` says what to do when it is not there."""
    if not file.is_file():
        raise EdgeportError(f"{file.parent}: no {file.name} ({missing})")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeportError(f"{file}: not valid JSON ({e})") from e
