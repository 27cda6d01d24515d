"""FSDP2 shards the model before it reaches the device: two gloo processes each hold ~1/2 of the parameter bytes
after ``fully_shard``, the trainer never moves the whole model (``nn.Module.to``) before sharding it, and only
rank 0 reads the weights (rank 1's model is on the meta device until its shards are filled from rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import TINY_SCALES, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# ``fastnest train`` (one step) that records, when the trainer wraps the model: the modules moved with
# ``nn.Module.to`` since the model was loaded, the model's parameter bytes, and this process's resident
# parameter bytes after wrapping (the storages of the local shards, FSDP's padding included).
DRIVER = """
import json, os, sys
import torch
from fastnest.train import distributed, trainer
moved = []
module_to = torch.nn.Module.to
def spied_to(self, *args, **kwargs):
    moved.append(type(self).__name__)
    return module_to(self, *args, **kwargs)
torch.nn.Module.to = spied_to
load = trainer._load
def spied_load(*args, **kwargs):
    out = load(*args, **kwargs)
    moved.clear()
    return out
trainer._load = spied_load
wrap = distributed.wrap
def spied_wrap(model, strategy, d, *args):
    before = list(moved)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    meta = [p.is_meta for p in model.parameters()] + [b.is_meta for b in model.buffers()]
    out = wrap(model, strategy, d, *args)
    local = {}
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        local[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    record = {"moved": before, "full": full, "local": sum(local.values()), "world": d.world, "meta": meta}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        record["weights"] = {k: v.double().sum().item() for k, v in whole.items()}
    record["buffers"] = {k: b.double().sum().item() for k, b in model.named_buffers()}
    with open(os.environ["PROBE"] + f".{d.rank}.json", "w") as f:
        json.dump(record, f)
    return out
distributed.wrap = spied_wrap
from fastnest.train.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_fsdp2_shards_before_the_device_and_each_process_holds_half(tmp_path, tiny_dir):
    args = ["--model", str(tiny_dir), "--scales", ",".join(map(str, TINY_SCALES)), "--steps", "1"]
    args += ["--batch-size", "2", "--system", "A chat", "--synthetic-turns", "2", "--no-progress", "--no-analyze"]
    args += ["--device", "cpu", "--strategy", "fsdp", "--output-dir", str(tmp_path / "run")]
    probe = tmp_path / "probe"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PROBE=str(probe))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run([*cmd, str(driver), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{probe}.{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["moved"] == []  # the model went to the device as shards (fully_shard moves each unit's)
        assert rank["world"] == 2
        # Each dim-0 shard is ceil(rows / 2) rows: at most one row of padding per parameter over the half.
        assert rank["full"] / 2 <= rank["local"] <= rank["full"] / 2 * 1.05
    assert not any(ranks[0]["meta"]) and all(ranks[1]["meta"])  # rank 1 read no weights
    # the sharded model holds the checkpoint's weights, and rank 1's buffers (RoPE's, outside the state dict) are
    # rank 0's: sums of every tensor against the checkpoint loaded in this process
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()
    assert set(ranks[0]["weights"]) == set(saved)
    for name, total in ranks[0]["weights"].items():
        assert total == pytest.approx(saved[name].double().sum().item(), rel=1e-12, abs=1e-12), name
    assert ranks[1]["buffers"] == ranks[0]["buffers"]
