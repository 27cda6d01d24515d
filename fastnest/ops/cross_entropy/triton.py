"""Triton kernel for one chunk of the fused linear cross-entropy: softmax, per-row loss and d(loss)/d(logits).

One program per logits row. Pass 1 streams the row in ``BLOCK_V`` blocks with an online max / sum-exp (fp32);
pass 2 overwrites the row with ``coef * (softmax - onehot(target))``, so the chunk buffer that held the logits
holds their gradient and the caller's two GEMMs (d hidden, d weight) read it in place. No GEMM happens here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...constants import IGNORE_INDEX

# (BLOCK_V, num_warps) by vocabulary size: a small vocabulary in one block, a large one in 4096-wide blocks
# (AOT-compiled for sm_80 and sm_90: at most 40 registers, no spills).
SMALL_VOCAB = (1024, 4)
LARGE_VOCAB = (4096, 8)
NUM_STAGES = 2
LOGIT_TYPES = ("fp32", "bf16", "fp16")  # the chunk buffer has hidden's dtype


@triton.jit
def ce_grad_kernel(
    logits_ptr,
    row_stride,
    targets_ptr,
    coef_ptr,
    loss_ptr,
    vocab,
    IGNORE_INDEX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    valid = target != IGNORE_INDEX
    target_logit = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    scale = tl.where(valid, tl.load(coef_ptr + row), 0.0)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        inside = offs < vocab
        z = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(base + offs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=inside)


def _config(vocab: int) -> tuple[int, int]:
    return SMALL_VOCAB if vocab <= SMALL_VOCAB[0] else LARGE_VOCAB


def ce_grad_(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, loss: torch.Tensor) -> None:
    """Per row ``i`` of ``logits [C, V]`` (rows contiguous): ``loss[i] = logsumexp - logits[i, target]`` in fp32
    and ``logits[i] <- coef[i] * (softmax - onehot(target))``; a row whose target is ``IGNORE_INDEX`` (-100) gets
    loss 0 and gradient 0. ``targets`` int64 [C] in ``[0, V)`` or ``IGNORE_INDEX``; ``coef``, ``loss``: fp32 [C]."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block, warps = _config(vocab)
    ce_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        coef,
        loss,
        vocab,
        IGNORE_INDEX=IGNORE_INDEX,
        BLOCK_V=block,
        num_warps=warps,
        num_stages=NUM_STAGES,
    )
