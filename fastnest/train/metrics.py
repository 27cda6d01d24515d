"""``metrics.jsonl``: one JSON record per step, appended whole; a torn last line never blocks a resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("fastnest.train")


def append(path: Path, record: dict) -> None:
    """Append ``record`` as one line with a single write (a kill or full disk can tear only this line)."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
    finally:
        os.close(fd)


def read(path: Path) -> list[dict]:
    """The records of ``path``; a torn last line (a kill or a full disk during its append) is dropped with a
    warning; a bad line before it is an error naming the file and line."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path} line {i + 1} is not a JSON record ({e}); fix or remove that line") from e
            log.warning("%s: dropped its torn last line %d (%d bytes, not a whole record)", path, i + 1, len(raw))
    return records


def truncate(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (a resume re-runs those after it), rewritten atomically."""
    if not path.is_file():
        return
    kept = [r for r in read(path) if r["step"] <= step]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
