"""Mixed precision of a run: bf16 autocast, or fp16 autocast with a grad scaler (fp16 never trains without one).

The master weights stay in the dtype they were loaded in (``--dtype``, float32 by default); autocast computes in
the half dtype. fp16's narrow range needs the loss scaled before backward and the gradients unscaled before the
norm: a step whose unscaled gradients overflow is skipped and the scale lowered (``torch.amp.GradScaler``), which
is the scaler's business, not a fault for the non-finite guard.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("float32", "bfloat16", "float16")


def check_precision(dtype: str, bf16: bool, fp16: bool) -> None:
    """ValueError for a ``--dtype`` / ``--bf16`` / ``--fp16`` combination that cannot train as asked."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 are exclusive: choose one autocast dtype")
    if dtype == "float16":
        raise ValueError(
            "--dtype float16: fp16 master weights would train without a grad scaler (AdamW's state in fp16, eps "
            "1e-8 rounding to 0, small gradients underflowing); load in float32 (the default) and add --fp16 for "
            "fp16 autocast with a grad scaler"
        )
    if fp16 and dtype != "float32":
        raise ValueError(
            f"--fp16 needs float32 master weights (the grad scaler unscales fp32 gradients), got --dtype {dtype}"
        )


def check_strategy(fp16: bool, strategy: str) -> None:
    if fp16 and strategy == "fsdp":
        raise ValueError(
            "--fp16 with FSDP2 is not supported (its grad scaler would check sharded gradients); use --bf16, or "
            "--strategy ddp"
        )


def autocast(device: torch.device, bf16: bool, fp16: bool, strategy: str):
    """The forward's autocast context (FSDP2's bf16 comes from its mixed-precision policy instead)."""
    if fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    if bf16 and strategy != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LossScaler:
    """``torch.amp.GradScaler`` around one optimizer, without a host sync of its own: the loop reads the unscaled
    gradient norm anyway, so a finite norm steps the optimizer directly and a non-finite one skips the step;
    ``update`` then lowers the scale after an overflow (or raises it after enough clean steps) on the device."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer) -> None:
        self.scaler = torch.amp.GradScaler(device.type)
        self.optimizer = optimizer
        self.unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale(self) -> None:
        """Divide the gradients by the scale (before their norm and clipping); records whether any overflowed."""
        self.scaler.unscale_(self.optimizer)
        self.unscaled = True

    def update(self) -> None:
        """After the step (applied or skipped): the next scale, from this step's overflow check."""
        if self.unscaled:
            self.scaler.update()
        self.unscaled = False

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
