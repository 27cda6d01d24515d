"""The fused linear cross-entropy: ``grouped_cross_entropy(hidden @ weight.T + bias, ...)`` without ever holding
all the logits, one chunk of logits at a time; the backend table of the cross-entropy op."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...constants import IGNORE_INDEX
from ...dispatch import resolve_backend
from .naive import denominators, group_sums

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every chunk reads and writes the whole fp32 [V, Hd] weight-gradient accumulator, so that GEMM's arithmetic
# intensity is about the chunk's row count: on CPU (T=2048, Hd=256, V=32000) 17-row chunks took 4.5x, 64 rows
# 2x and 128 rows 1.5x the time of 256-row chunks, which match unchunked logits + CE.
MIN_CHUNK_ROWS = 256


def chunk_rows(num_tokens: int, hidden_size: int, vocab: int) -> int:
    """Rows per logits chunk: ``ceil(T * Hd / V)`` rounded up to a multiple of 16 (GEMM tiles; aligned chunk
    starts), so that one ``[rows, V]`` chunk holds about as many elements as the hidden input ``[T, Hd]``;
    but at least ``MIN_CHUNK_ROWS`` (small inputs keep efficient GEMMs, still a chunk bounded whatever T)
    and at most ``T`` (at least 1)."""
    rows = 16 * math.ceil(num_tokens * hidden_size / (16 * vocab))
    return max(1, min(num_tokens, max(MIN_CHUNK_ROWS, rows)))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_group: torch.Tensor,
    num_groups: int,
    *,
    bias: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grouped_cross_entropy(hidden @ weight.T + bias, targets, target_group, num_groups, num_items)`` without
    ever holding all the logits.

    ``hidden [T, Hd]``, ``weight [V, Hd]`` (e.g. a tied input embedding: autograd adds both uses' gradients)
    and ``bias [V]`` share one float dtype and device; ``targets`` and ``target_group`` are on that device or on
    the host (checked there, with no device-to-host sync, then copied). Rows go through in chunks of ``chunk_size`` (default
    ``chunk_rows(T, Hd, V)``: a logits chunk about the size of ``hidden``); each chunk's logits are turned
    into their gradient in place and consumed by two GEMMs, so the forward pass also computes the gradients
    of ``hidden``, ``weight`` (accumulated in fp32 across chunks) and ``bias``. Memory besides inputs and
    outputs: one logits chunk (and an fp32 copy of it for half dtypes), the fp32 weight-gradient accumulator,
    and the gradients held from forward to backward (with ``hidden``, kept for the recomputing backward: if
    ``per_group`` itself gets a gradient, not just ``loss``, backward reruns the chunks with per-group weights).

    ``backend``: None/"auto", "triton", "native" or "torch", resolved by ``fastnest.dispatch.resolve_backend``
    (``_KERNELS`` maps it to the chunk kernel that runs).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast runs a linear layer: in its dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
    _check_inputs(hidden, weight, bias, targets, target_group, num_groups, chunk_size)
    targets, target_group = (
        t.long().contiguous().to(hidden.device, non_blocking=True) for t in (targets, target_group)
    )
    kernel = _KERNELS[resolve_backend("cross_entropy", hidden.device, backend)]()
    rows = chunk_size or chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    denom = denominators(targets, target_group, num_groups, num_items)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(device_type, enabled=False):  # the chunk GEMMs choose their own precision
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, target_group, denom, rows, kernel, needs)


CeGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _triton() -> CeGrad:
    from . import triton

    return triton.ce_grad_


def _native() -> CeGrad:
    from . import native

    return native.ce_grad_


def _torch() -> CeGrad:
    from . import torch_chunk

    return torch_chunk.ce_grad_


# The per-chunk softmax / loss / d-logits step, ``ce_grad_(logits, targets, coef, loss)``, of each backend; the
# chunk GEMMs are ATen's (cuBLAS, MKL) for every backend.
_KERNELS: dict[str, Callable[[], CeGrad]] = {"triton": _triton, "native": _native, "torch": _torch}


def _token_coef(target_group: torch.Tensor, valid: torch.Tensor, group_coef: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T]``: d(sum_g group_coef[g] * group_sum[g]) / d(ce_i): its group's coefficient, the sum of all
    of them for a group -1 target, 0 for an ignored one."""
    coef = torch.where(target_group < 0, group_coef.sum(), group_coef[target_group.clamp(min=0)])
    return torch.where(valid, coef, 0.0)


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor,
    rows: int,
    kernel: Callable,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token CE (fp32 ``[T]``) and the gradients of ``sum_i coef_i * ce_i`` with respect to hidden, weight
    and bias (None where not needed), one ``[rows, V]`` logits buffer reused for every chunk."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_hidden, need_weight, need_bias = needs
    ce = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    # fp32 accumulators across chunks; cast to the parameter's dtype at the end
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
    buffer = hidden.new_empty(min(rows, num_tokens), vocab)
    for start in range(0, num_tokens, rows):
        stop = min(start + rows, num_tokens)
        h, z = hidden[start:stop], buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias, h, weight.t(), out=z)
        kernel(z, targets[start:stop], coef[start:stop], ce[start:stop])  # z now holds d(coef * ce) / d logits
        if need_hidden:
            torch.mm(z, weight, out=d_hidden[start:stop])
        if need_weight:  # half inputs go through one fp32 copy of the chunk: exact fp32 accumulation
            d_weight.addmm_(z.t().float(), h.float())
        if need_bias:
            d_bias += z.sum(0, dtype=torch.float32)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return ce, d_hidden, d_weight, d_bias


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, assuming only ``loss`` is differentiated, every gradient; backward scales
    them by the incoming gradient, or recomputes when ``per_group`` gets one (its per-token weights differ by
    group, so the fp32 weight gradient cannot be rescaled after the fact)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, target_group, denom, rows, kernel, needs):
        num_groups = denom.numel()
        valid = targets != IGNORE_INDEX
        coef = _token_coef(target_group, valid, (1.0 / num_groups) / denom)  # d loss / d ce_i
        ce, *grads = _chunked_pass(hidden, weight, bias, targets, coef, rows, kernel, needs)
        per_group = group_sums(ce, target_group, num_groups) / denom
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, target_group, denom, *grads)
        ctx.rows, ctx.kernel, ctx.needs = rows, kernel, needs
        return per_group.mean(), per_group

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_per_group):
        hidden, weight, bias, targets, target_group, denom, *grads = ctx.saved_tensors
        if grad_per_group is None:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        else:
            group_coef = grad_per_group.float()
            if grad_loss is not None:
                group_coef = group_coef + grad_loss.float() / denom.numel()
            coef = _token_coef(target_group, targets != IGNORE_INDEX, group_coef / denom)
            with torch.autocast(hidden.device.type, enabled=False):
                _, *grads = _chunked_pass(hidden, weight, bias, targets, coef, ctx.rows, ctx.kernel, ctx.needs)
        return *grads, None, None, None, None, None, None


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    target_group: torch.Tensor,
    num_groups: int,
    chunk_size: int | None,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [vocab >= 1, {hidden_size}] for hidden {tuple(hidden.shape)}, got shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got shape {tuple(bias.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: {_FLOAT_DTYPES}")
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but hidden is {hidden.dtype} on {hidden.device}")
    for name, t in (("targets", targets), ("target_group", target_group)):
        if tuple(t.shape) != (num_tokens,) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of shape ({num_tokens},), got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != hidden.device and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device} (or the host)")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per logits chunk), got {chunk_size}")
    if num_tokens == 0:
        return
    bad_target = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    bad_group = (target_group < -1) | (target_group >= num_groups)
    # One device-to-host read for targets on the device; none for host targets (the training step's).
    any_bad_target, any_bad_group = torch.stack([bad_target.any(), bad_group.any()]).tolist()
    if any_bad_target:
        raise ValueError(
            f"target {int(targets[bad_target][0])} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}"
        )
    if any_bad_group:
        raise ValueError(f"target_group holds {int(target_group[bad_group][0])}; allowed: -1 and [0, {num_groups})")
