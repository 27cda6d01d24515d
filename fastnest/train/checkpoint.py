"""Atomic checkpoints and exact resume.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only when
complete, so a process killed while saving leaves the previous checkpoints intact; leftovers are removed on
the next start. It holds the model (``model/``: Hugging Face ``save_pretrained``, safetensors, processor and
fastnest settings), ``trainer_state.pt`` (optimizer, scheduler, step, data position), each process's RNG
state (``rng-rank<r>.pt``: Python, NumPy, torch, and the generator of a patch that draws each step's token
counts, MQT's ``released`` / ``random:K``) and ``trajectory.json`` (the options a resume must match, ``resume.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..hf.state import patch_state
from .distributed import Dist, unwrap
from .model import save_run_model
from .resume import TRAJECTORY_FILE

log = logging.getLogger("fastnest.train")
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.pt"
PREFIX = "step-"
TMP = ".tmp-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _count_draw(model) -> random.Random | None:
    """The generator of the patch's per-step token-count draw (``fastnest.hf.draw.TokenDraw``), if any."""
    return getattr(patch_state(model).draw, "rng", None)


def _full_state_dicts(model, optimizer, strategy: str) -> tuple[dict, dict]:
    if strategy != "fsdp":
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    processor,
    settings: dict,
    progress: dict,
    strategy: str,
    d: Dist,
    keep: int,
    trajectory: dict | None = None,
    scaler=None,
) -> Path:
    """Write checkpoint ``step`` atomically (every process calls this); return its directory."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"{PREFIX}{step:08d}", root / f"{TMP}{PREFIX}{step:08d}"
    model_sd, optim_sd = _full_state_dicts(model, optimizer, strategy)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_run_model(unwrap(model), processor, tmp / "model", settings, state_dict=model_sd)
        state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "progress": progress, "world": d.world}
        if scaler is not None:  # --fp16's loss scale and its growth count
            state["scaler"] = scaler.state_dict()
        torch.save(state, tmp / STATE)
        if trajectory is not None:  # the options a resume is checked against (resume.py)
            (tmp / TRAJECTORY_FILE).write_text(json.dumps(trajectory, indent=2, default=list) + "\n")
    d.barrier()
    draw = _count_draw(model)
    torch.save(
        {**rng_state(), **({"count_draw": draw.getstate()} if draw is not None else {})}, tmp / f"rng-rank{d.rank}.pt"
    )
    d.barrier()
    if d.main:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            _discard(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in complete(run_dir)[:-keep] if keep > 0 else []:
            _discard(old)
    d.barrier()
    return final


def _discard(path: Path) -> None:
    """Remove a checkpoint so that no half-deleted one ever looks complete: rename first, then delete."""
    trash = path.with_name(f"{TMP}trash-{path.name}")
    path.rename(trash)
    shutil.rmtree(trash)


def complete(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete temporary directories a killed save left behind; return what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    stale = [p for p in root.iterdir() if p.name.startswith(TMP)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def find(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest complete checkpoint of the run ``path``."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    found = complete(path)
    if not found:
        raise ValueError(
            f"--resume {path}: neither a checkpoint nor a run directory holding one (checkpoints/{PREFIX}N)"
        )
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def load_state(checkpoint: Path, optimizer, scheduler, strategy: str, model, d: Dist, scaler=None) -> dict:
    """Restore optimizer, scheduler, grad scaler (when both have one), this process's RNG and the patch's count
    draw; return the saved progress."""
    state = torch.load(checkpoint / STATE, map_location="cpu", weights_only=False)
    if state["world"] != d.world:
        raise ValueError(
            f"checkpoint {checkpoint} was written by {state['world']} process(es); exact resume needs the same "
            f"number, got {d.world}"
        )
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng = torch.load(checkpoint / f"rng-rank{d.rank}.pt", weights_only=False)
    set_rng_state(rng)
    draw = _count_draw(model)
    if draw is not None:
        if "count_draw" not in rng:
            raise ValueError(
                f"checkpoint {checkpoint} holds no state of the per-step token-count draw (--num-tokens released or "
                "random:K), so the resumed run would draw other counts; resume from a checkpoint of this run"
            )
        draw.setstate(rng["count_draw"])
    return state["progress"]
