"""The options that define a run's trajectory, saved with each checkpoint and compared on ``--resume``.

Exact resume holds only when the continued run has the same options: another batch size shifts the data
position, other scales or another seed train another model. Each checkpoint holds ``trajectory.json`` (these
options, the data file's content hash, and the overrides accepted so far); ``--resume`` refuses any difference,
listing each, unless the option is one that is safe to change and is named in ``--resume-override``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("fastnest.train")
TRAJECTORY_FILE = "trajectory.json"
# Safe to change on resume: the weights, optimizer and data position still continue the run.
OVERRIDABLE = (
    "steps",
    "lr",
    "lr_vision",
    "lr_projector",
    "lr_lm",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "max_length",
    "model",
    "image_folder",
    "bf16",
    "fp16",
    "dtype",
)
# Options added after checkpoints began saving their trajectory: a checkpoint without one ran with this value.
ADDED_LATER = {
    "fp16": False,
    "dtype": "float32",
    "connector": "pooled",
    "scale_sampling": "all",
    "num_tokens": None,
    "num_queries": None,
    "query_keys": None,
    "arch": None,
}
# Never: another data order, another model definition or other optimizer groups.
FIXED = (
    "data",
    "data_sha256",
    "connector",
    "arch",
    "scales",
    "scale_sampling",
    "num_tokens",
    "num_queries",
    "query_keys",
    "batch_size",
    "grad_accum",
    "seed",
    "freeze",
    "system",
    "synthetic_turns",
)


def check_override_names(names: tuple[str, ...]) -> None:
    """ValueError for a ``--resume-override`` name that is not an option safe to change."""
    for name in names:
        key = name.replace("-", "_")
        if key in FIXED:
            raise ValueError(
                f"--resume-override {name}: {name} cannot change on resume (it changes the data order or the "
                f"model); options that can: {','.join(OVERRIDABLE)}"
            )
        if key not in OVERRIDABLE:
            raise ValueError(f"--resume-override {name!r} is not an option; allowed: {','.join(OVERRIDABLE)}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trajectory(cfg) -> dict:
    """The options of ``cfg`` (a ``TrainConfig``) that define its trajectory, as JSON values."""
    out = {
        "model": str(Path(cfg.model).resolve()) if cfg.model is not None else "built-in",
        "data": str(Path(cfg.data).resolve()) if cfg.data is not None else "built-in synthetic",
        "data_sha256": file_sha256(cfg.data) if cfg.data is not None else None,
        "image_folder": str(Path(cfg.image_folder).resolve()) if cfg.image_folder is not None else None,
        "scales": list(cfg.scales) if cfg.scales is not None else None,  # None: an MQT run (num_tokens)
        "freeze": list(cfg.freeze),
    }
    for name in OVERRIDABLE + FIXED:
        if name not in out:
            out[name] = getattr(cfg, name)
    return out


def check(checkpoint_dir: Path, current: dict, overrides: tuple[str, ...]) -> list[dict]:
    """Compare ``current`` with the checkpoint's saved trajectory; return the accepted overrides (option, saved,
    now), or ValueError listing every changed option."""
    file = checkpoint_dir / TRAJECTORY_FILE
    if not file.is_file():
        log.warning("%s has no %s (an older checkpoint): its options cannot be compared", checkpoint_dir, file.name)
        return []
    saved = json.loads(file.read_text())
    allowed = {name.replace("-", "_") for name in overrides}
    saved = {**ADDED_LATER, **saved}
    changed = [(k, saved.get(k), v) for k, v in current.items() if k != "overrides" and saved.get(k) != v]
    refused = [c for c in changed if c[0] not in allowed]
    if refused:
        lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {old!r}, now {new!r}" for k, old, new in refused)
        safe = [k for k, _, _ in refused if k in OVERRIDABLE]
        hint = f"; to change {','.join(safe)} on purpose, pass --resume-override {','.join(safe)}" if safe else ""
        raise ValueError(
            f"--resume {checkpoint_dir}: options differ from the checkpoint's, so the run would not continue as it "
            f"was:\n{lines}\nresume with the checkpoint's values{hint}"
        )
    return [{"option": k, "checkpoint": old, "now": new} for k, old, new in changed]


def history(checkpoint_dir: Path | None, accepted: list[dict], step: int) -> list[dict]:
    """The overrides of the run so far: the checkpoint's, then those accepted now (at ``step``)."""
    file = checkpoint_dir / TRAJECTORY_FILE if checkpoint_dir is not None else None
    before = json.loads(file.read_text()).get("overrides", []) if file is not None and file.is_file() else []
    return before + [{**o, "at_step": step} for o in accepted]
