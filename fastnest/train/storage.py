"""Writing a run's files: the output directory checked at the start, a full disk named as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

LOW_SPACE = 64 << 20  # bytes: below this, a failed write is taken to be a full disk


class DiskFullError(RuntimeError):
    """No space left on the device holding the run directory."""


def check_output_dir(path: Path, flag: str = "--output-dir") -> None:
    """ValueError naming ``path`` when it is a file, cannot be created or cannot be written."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; it must be a directory (or not exist yet)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be created: {e.strerror or e}") from e
    probe = path / f".fastnest-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable: {e.strerror or e}") from e


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def is_disk_full(error: BaseException, path: Path) -> bool:
    """``error`` (from os, torch.save or safetensors) says the device is full, or is a failed write on a device
    with (almost) no space left (torch's ``inline_container.cc`` message does not carry the errno)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "StorageFull" in text:
        return True
    free = _free_bytes(path)
    return "inline_container" in text and free is not None and free < LOW_SPACE


@contextlib.contextmanager
def writing(what: str, path: Path, after: str = "") -> Iterator[None]:
    """Turn a full-disk failure inside the block into ``DiskFullError`` naming ``what``, ``path`` and ``after``
    (what is still intact, how to go on); other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        free = _free_bytes(path)
        raise DiskFullError(
            f"no space left on device writing {what} ({path}; {free} bytes free){after}: free some space first"
        ) from e


def replace_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temporary sibling and a rename."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)
