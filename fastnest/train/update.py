"""One optimizer step of the loop: the micro-batches, forward/backward with accumulation, the gradient norm,
and the update (applied only when the non-finite guard allows it)."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
from ..hf import patch_state
from .data_llava import count_targets
from .guards import grad_norm

log = logging.getLogger("fastnest.train")


@dataclass
class StepStats:
    loss: float  # summed over processes
    scale_losses: dict[int, float]  # per token count of the step: the token-mean loss of the micro-batches it ran
    tokens: int  # language-model tokens run, all processes
    grad_norm: float  # global, before clipping (0.0 when no update was computed)
    num_items: int  # answer tokens of the global batch (0: nothing to learn, no update)


def micro_batches(run, step: int) -> list:
    cfg, d = run.cfg, run.d
    micro = []
    for m in range(cfg.grad_accum):
        first = step * run.world_batch + (m * d.world + d.rank) * cfg.batch_size
        rows = [run.examples.example(run.order[p], run.bad) for p in range(first, first + cfg.batch_size)]
        micro.append(run.collate(rows, run.bad))
    return micro


class CountLosses:
    """Each token count's losses summed over the micro-batches that ran it (on the device), and their answer
    tokens (global). A count drawn per forward (MQT's ``released``) may run in some micro-batches only: its loss
    is then rescaled from the batch's normalisation (``num_items``) to its own micro-batches' tokens."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}  # first-seen order: the same on every process (same draws)
        self.items: dict[int, float] = {}

    def add(self, counts: tuple[int, ...], losses: torch.Tensor, items: float) -> None:
        for i, s in enumerate(counts):
            self.sums[s] = losses[i].double() + self.sums[s] if s in self.sums else losses[i].double()
            self.items[s] = self.items.get(s, 0) + items

    def stacked(self, device: torch.device) -> torch.Tensor:
        if not self.sums:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack(list(self.sums.values())).to(device)

    def means(self, summed: list[float], num_items: float) -> dict[int, float]:
        """Per count, its loss over its own micro-batches' answer tokens (counts that met none are left out)."""
        out = {}
        for (s, items), value in zip(self.items.items(), summed):
            if items:
                out[s] = value if items == num_items else value * num_items / items
        return out


def forward_backward(run, step: int, autocast, trainable) -> StepStats:
    """Gradients of the accumulated micro-batches (not yet applied); the losses and tokens, summed over
    processes, and the global gradient norm (clipped per ``--max-grad-norm`` when finite).

    A micro-batch's token counts are its output's ``scales`` (the patch's, or drawn for that forward).
    Host syncs: the losses and the norm stay on the device until one read at the end of the step (with the
    all-reduce across processes before it); ``input_ids``, ``attention_mask`` and ``labels`` stay on the host,
    where the step plans them (only the images and the plan's index tensors are copied to the device)."""
    cfg, d = run.cfg, run.d
    micro = micro_batches(run, step)
    items = d.sum([count_targets(b.inputs["labels"], b.inputs["attention_mask"]) if b else 0 for b in micro])
    num_items = sum(items)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    counts = CountLosses()
    tokens = 0
    for m, batch in enumerate(micro if num_items else ()):  # no target in the whole global batch: no update
        inputs = batch.inputs if batch is not None else None
        if inputs is None and not d.enabled:
            continue
        if d.enabled and (inputs is None or "pixel_values" not in inputs):
            # Every process must run the same modules (DDP waits for every gradient, FSDP2 for every
            # all-gather): a label-free dummy image row costs a little and changes no gradient.
            inputs = with_dummy_row(inputs, patch_state(run.model).adapter.dummy_row(run.model))
        with no_sync(run.wrapped, run.strategy, m == cfg.grad_accum - 1):
            inputs = images_to_device(inputs, d.device)
            with autocast:
                out = run.wrapped(**inputs, num_items_in_batch=num_items)
            loss = out.loss * d.world
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        loss_sum += out.loss.detach().double().to(d.device)
        counts.add(tuple(out.scales), out.scale_losses, items[m])
        tokens += out.lm_tokens
    if num_items and run.scaler is not None:
        run.scaler.unscale()  # the norm, the clipping and the update see the true gradients
    norm = grad_norm(trainable, cfg.max_grad_norm) if num_items else None
    return _read_stats(d, loss_sum, counts, tokens, norm, num_items)


def images_to_device(inputs: dict, device: torch.device) -> dict:
    """The micro-batch as the patched model takes it: the images on ``device``, the token ids, mask and labels
    on the host (the plan reads them there; the embedding moves the ids it looks up)."""
    return {k: v.to(device, non_blocking=True) if k == "pixel_values" else v for k, v in inputs.items()}


def _on(device: torch.device, value: float) -> torch.Tensor:
    return torch.tensor([float(value)], dtype=torch.float64).to(device, non_blocking=True)


def _read_stats(d, loss_sum: torch.Tensor, counts: CountLosses, tokens: int, norm, num_items) -> StepStats:
    """The step's numbers on the host in one device-to-host read (after one all-reduce across processes)."""
    summed = torch.cat([loss_sum.view(1), counts.stacked(d.device), _on(d.device, tokens)])
    if d.enabled:
        torch.distributed.all_reduce(summed)
    norm = torch.zeros((), dtype=torch.float64, device=d.device) if norm is None else norm
    host = torch.cat([summed, norm.to(summed.device, torch.float64).view(1)]).tolist()
    return StepStats(host[0], counts.means(host[1:-2], num_items), int(host[-2]), host[-1], int(num_items))


def decide(run, step: int, stats: StepStats) -> bool:
    """Whether to apply this step's update: not without targets, not after an fp16 overflow (the scaler lowers
    its scale: not a fault), not when non-finite (the guard skips, or stops with ``NonFiniteError``)."""
    if stats.num_items == 0:
        log.warning("step %d: every row of the global batch was skipped; no update", step + 1)
        return False
    if run.scaler is not None and math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm):
        log.warning("step %d: fp16 gradients overflowed: update skipped, the loss scale lowered", step + 1)
        return False
    last = str(run.last_saved) if run.last_saved is not None else None
    apply = run.guard.check(step + 1, stats.loss, stats.grad_norm, last)
    if not apply:
        log.warning(
            "step %d: loss %s, gradient norm %s not finite: update skipped (%d in a row, --max-nonfinite-skips %d)",
            step + 1, stats.loss, stats.grad_norm, run.guard.in_a_row, run.guard.max_skips,
        )  # fmt: skip
    return apply


def finish_step(run, apply: bool) -> None:
    """Apply the gradients (optimizer and schedule step) when ``apply``, else drop them (no update). No host
    sync: the update runs on while the next step is planned (its time counts in the next step's)."""
    if apply:
        run.optimizer.step()
        run.scheduler.step()
    if run.scaler is not None:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def with_dummy_row(inputs: dict | None, dummy: dict[str, torch.Tensor]) -> dict:
    """``inputs`` plus ``dummy`` (a label-free row with its own image, ``ModelAdapter.dummy_row``), padded on the
    right to a common width; the batch's loss and gradients are unchanged."""
    if inputs is None:
        return dummy
    width = max(inputs["input_ids"].shape[1], dummy["input_ids"].shape[1])
    pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    merged = {
        k: torch.cat([torch.nn.functional.pad(t[k], (0, width - t[k].shape[1]), value=v) for t in (inputs, dummy)])
        for k, v in pad.items()
    }
    images = ("pixel_values", "image_sizes")  # the dummy's image is the only one (anyres: with its size)
    return {**merged, **{k: dummy[k] for k in images if k in dummy}}


def no_sync(model, strategy: str, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if strategy == "ddp" and not last:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()
