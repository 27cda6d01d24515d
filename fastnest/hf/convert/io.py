"""Weight files read one at a time and written one shard at a time: a conversion holds at most one source
file's tensors (``.safetensors`` read through its header, ``.bin`` memory-mapped), never the whole model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint's weight files: its index's shards (safetensors first, as Hugging Face), else its one file."""
    for name in INDEXES:
        index = directory / name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' naming the shard of each tensor")
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index} names shards that are not in {directory}: {absent}")
            return files
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{directory}: no weights (looked for {', '.join(INDEXES + SINGLE_FILES)})")


@contextmanager
def opened(path: Path) -> Iterator[dict[str, object]]:
    """``{name: handle}`` of one weight file; ``shape(handle)`` and ``load(handle)`` read it lazily."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt", device="cpu") as f:
            yield {name: (f, name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    else:  # a torch.save zip: mmap reads a tensor's bytes only when they are used
        yield torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def shape(handle) -> tuple[int, ...]:
    if isinstance(handle, torch.Tensor):
        return tuple(handle.shape)
    f, name = handle
    return tuple(f.get_slice(name).get_shape())


def load(handle) -> torch.Tensor:
    if isinstance(handle, torch.Tensor):
        return handle
    f, name = handle
    return f.get_tensor(name)


class ShardWriter:
    """Writes ``count`` safetensors shards in turn (``model.safetensors`` when there is one) and their index."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory, self.count = directory, count
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.written += 1
        name = "model.safetensors" if self.count == 1 else f"model-{self.written:05d}-of-{self.count:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.directory / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        if self.written != self.count:
            raise RuntimeError(f"ShardWriter: {self.written} shards written, {self.count} announced")
        if self.count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.directory / INDEXES[0]).write_text(json.dumps(index, indent=2) + "\n")
