"""AdamW with one parameter group per model part, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def optimizer(groups: dict[str, list[torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """One parameter group per part with trainable parameters (``groups``: the adapter's parameter groups).
    Built after wrapping: FSDP2 replaces parameters."""
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "lm": cfg.lr_lm}
    param_groups = []
    for part, params in groups.items():
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            lr = lrs[part] if lrs[part] is not None else cfg.lr
            param_groups.append({"params": trainable, "lr": lr, "name": part})
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def scheduler(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
