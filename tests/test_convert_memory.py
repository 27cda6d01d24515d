"""The conversion holds about one shard's tensors, not the model: converting a checkpoint of 6 shards in a fresh
process raises its peak resident memory by far less than the checkpoint's size (a converter that loads
everything first needs at least all of it)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors import safe_open

from tools.convert_memory import generate, measure

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_about_one_shard(tmp_path):
    shards = generate(
        tmp_path, hidden=512, intermediate=1408, layers=12, heads=8, vocab=4096, shards=6, dtype=torch.float32
    )
    total, largest = sum(shards.values()), max(shards.values())
    assert total > 5 * largest  # ~160 MiB in shards of ~27 MiB
    result = measure(tmp_path / "original", tmp_path / "hf")
    grown = (result["peak_rss_mib"] - result["rss_before_mib"]) * MIB
    assert grown < 2.5 * largest, (grown / MIB, largest / MIB)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 6
    written = 0
    for name in files:
        with safe_open(tmp_path / "hf" / name, "pt") as f:
            written += sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (fp32)
    assert written >= total  # everything was written (the vocabulary a little larger)
