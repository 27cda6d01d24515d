"""One process or many (``torchrun``): DDP with gloo on CPU / NCCL on GPU, FSDP2 (``fully_shard``) on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..hf.state import patch_state

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64 on the wire)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init(device: str = "auto") -> Dist:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, d: Dist) -> str:
    """``auto``: FSDP2 across several GPUs, DDP otherwise (one process: neither). ``fsdp`` also runs on CPU
    with gloo (slowly: for tests)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = "fsdp" if d.device.type == "cuda" and d.enabled else "ddp"
    return strategy if d.enabled else "none"


def wrap(model: torch.nn.Module, strategy: str, d: Dist, bf16: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 with every unit of the model's adapter (decoder and encoder layers) its own shard group,
    plus the root.

    FSDP2 takes rank 0's model on the host and every other rank's on the meta device (built from the config,
    no weights read): ``fully_shard`` keeps each process's shard of each unit on ``d.device``, the meta shards
    are allocated there, and rank 0 broadcasts the weights and buffers into them from its host copy (freed
    once they are sent). No device ever holds more than the shards plus one unit, and only rank 0's
    host ever holds the whole model."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None (allowed for a module on one device): DDP would copy every input to that device, and
        # the patched step plans input_ids/attention_mask/labels on the host (update.images_to_device).
        return DistributedDataParallel(model, device_ids=None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    full = model.state_dict() if d.main else {}
    for unit in patch_state(model).adapter.shard_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    _fill_from_rank0(model, full, d)
    keep_on_host(model)
    return model


HOST_INPUTS = ("input_ids", "attention_mask", "labels")  # what the patched step plans on the host


class _OnHost:
    """A host tensor FSDP2's input move passes over (it moves tensors, and tensors inside containers only)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def keep_on_host(root: torch.nn.Module) -> None:
    """Keep ``HOST_INPUTS`` on the host through FSDP2's root pre-forward.

    On CUDA that hook copies every tensor argument to the GPU; the patched step would then copy the ids, mask and
    labels back to plan them, and both copies wait for the previous micro-batch's backward. A hook before it
    hides them, one after it (hooks run in order) hands them over unchanged; the images still move."""

    def hide(module, args, kwargs):
        return args, {
            k: _OnHost(v) if k in HOST_INPUTS and isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }

    def reveal(module, args, kwargs):
        return args, {k: v.tensor if isinstance(v, _OnHost) else v for k, v in kwargs.items()}

    root.register_forward_pre_hook(hide, prepend=True, with_kwargs=True)
    root.register_forward_pre_hook(reveal, with_kwargs=True)


def _fill_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], d: Dist) -> None:
    """Every rank's shards and buffers from rank 0's whole model (``full``: its state dict; ``{}`` elsewhere).

    Other ranks' parameters are meta until here. Buffers outside the state dict (RoPE's ``inv_freq``) are
    broadcast too: ``to_empty`` leaves them uninitialised."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    metas = [p.is_meta for p in model.parameters()]
    if any(metas) != (not d.main) or (any(metas) and not all(metas)):
        where = "rank 0 holds meta parameters" if d.main else "a rank other than 0 holds loaded parameters"
        raise RuntimeError(f"FSDP2 expects rank 0's model loaded and the others' on the meta device; {where}")
    if not d.main:
        model.to_empty(device=d.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, src=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The patched LLaVA inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model)
