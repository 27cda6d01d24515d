"""FSDP2's root pre-forward copies every tensor argument to the GPU (``_to_kwargs``, as DDP does); the trainer's
FSDP2 root keeps ``input_ids``, ``attention_mask`` and ``labels`` on the host through it (the step plans them
there) while the images move. CPU has no GPU to move to: FSDP2's own move function is run with the meta device
standing in for it, in the place FSDP2 runs it (between the hooks that fastnest adds around its hook)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.utils import _to_kwargs

from fastnest.train.distributed import HOST_INPUTS, keep_on_host


class Echo(torch.nn.Module):
    def forward(self, **kwargs):
        return kwargs


def fsdp_like_move(module, args, kwargs):
    """FSDP2's root input move (torch.distributed.fsdp ... FSDPState._root_pre_forward) to a stand-in device."""
    moved_args, moved_kwargs = _to_kwargs(args, kwargs, torch.device("meta"), False)
    return moved_args[0], moved_kwargs[0]


def test_host_inputs_pass_the_root_input_move_unchanged():
    root = Echo()
    root.register_forward_pre_hook(fsdp_like_move, prepend=True, with_kwargs=True)  # fully_shard's own hook
    keep_on_host(root)  # what distributed.wrap adds after fully_shard
    inputs = {name: torch.arange(6).view(2, 3) for name in HOST_INPUTS}
    pixels = torch.zeros(2, 3, 4, 4)
    got = root(**inputs, pixel_values=pixels, num_items_in_batch=4)
    for name in HOST_INPUTS:
        assert got[name] is inputs[name]  # the very host tensors: no copy either way
    assert got["pixel_values"].is_meta  # the images still went to the device
    assert got["num_items_in_batch"] == 4

    plain = Echo()
    plain.register_forward_pre_hook(fsdp_like_move, prepend=True, with_kwargs=True)
    assert plain(**inputs)["input_ids"].is_meta  # without it, FSDP2's move takes them too


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_hooks_surround_fully_shards_pre_forward(one_process_group):
    from torch.distributed.fsdp import fully_shard

    root = torch.nn.Sequential(torch.nn.Linear(2, 2))
    fully_shard(root)
    fsdp_hooks = list(root._forward_pre_hooks.values())
    keep_on_host(root)
    hooks = list(root._forward_pre_hooks.values())
    assert [h.__name__ for h in hooks[:1] + hooks[-1:]] == ["hide", "reveal"]
    assert hooks[1:-1] == fsdp_hooks and fsdp_hooks
