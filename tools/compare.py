"""Gradient comparison between a reference model and a fastnest-patched copy."""

from __future__ import annotations

import torch


def assert_grads_match(ref, fast, rtol: float = 2e-4) -> None:
    """Every gradient within ``rtol`` of the reference, relative to that tensor's largest entry. Gradients that
    are analytically zero (e.g. attention key biases) are round-off noise: floor the scale at 1e-6 of the
    model's largest gradient."""
    floor = 1e-6 * max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    checked = 0
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        if p_ref.grad is None:
            assert p_fast.grad is None or not p_fast.grad.any(), name
            continue
        scale = max(p_ref.grad.abs().max().item(), floor)
        got = p_fast.grad if p_fast.grad is not None else torch.zeros_like(p_ref.grad)  # no gradient: a zero one
        torch.testing.assert_close(got, p_ref.grad, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked > 0
