"""Native CPU kernel for one chunk of the fused linear cross-entropy: a wrapper of ``fastnest._C.ce_grad``
(kernels/cpu/cross_entropy.cpp), the same contract as the Triton and PyTorch ``ce_grad_``. OpenMP over rows on
``torch.get_num_threads()`` threads, the GIL released."""

from __future__ import annotations

import torch

from ...constants import IGNORE_INDEX
from ..native_common import DTYPE_CODES, extension


def _check_vector(name: str, t: object, rows: int, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend, got device {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != (rows,) or (rows and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous [{rows}] tensor, got shape {tuple(t.shape)}")


def _check(logits: object, targets: object, coef: object, loss: object) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.device.type != "cpu":
        raise ValueError(f"logits must be a CPU tensor for the native backend, got device {logits.device}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [rows, vocab >= 1], got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPE_CODES:
        raise ValueError(f"logits has dtype {logits.dtype}; supported: {tuple(DTYPE_CODES)}")
    rows, vocab = logits.shape
    if rows and logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous, got strides {logits.stride()}")
    _check_vector("targets", targets, rows, torch.int64)
    _check_vector("coef", coef, rows, torch.float32)
    _check_vector("loss", loss, rows, torch.float32)
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    if bad.any():
        raise ValueError(
            f"target {int(targets[bad][0])} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}"
        )


@torch.no_grad()
def ce_grad_(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, loss: torch.Tensor) -> None:
    """Per row ``i`` of ``logits [C, V]`` (rows contiguous; fp32, bf16, fp16 or fp64): ``loss[i] = logsumexp -
    logits[i, target]`` computed in fp32 (fp64 for fp64) and ``logits[i] <- coef[i] * (softmax -
    onehot(target))`` in place; a row whose target is ``IGNORE_INDEX`` (-100) gets loss 0 and a zero row.
    ``targets`` int64 [C] in ``[0, V)`` or ``IGNORE_INDEX``; ``coef``, ``loss``: fp32 [C]."""
    _check(logits, targets, coef, loss)
    rows, vocab = logits.shape
    if rows == 0:
        return
    extension().ce_grad(
        logits.data_ptr(),
        logits.stride(0) if rows > 1 else vocab,
        targets.data_ptr(),
        coef.data_ptr(),
        loss.data_ptr(),
        rows,
        vocab,
        DTYPE_CODES[logits.dtype],
        torch.get_num_threads(),
    )
