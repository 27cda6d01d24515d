"""The training loop: a patched model, per-part learning rates, accumulation, DDP/FSDP2, checkpoints, analysis.

The loop talks to the model through its patch state and adapter (``fastnest.hf``): parameter groups, freezing,
shard units and the dummy row come from there; the step itself is the patched forward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from ..hf import patch, patch_state
from ..scales import MatryoshkaScales
from ..version import __version__
from . import checkpoint, distributed, optim
from .config import DEFAULT_STEPS, TrainConfig
from .data_llava import BAD_KINDS, BadSamples, Collator, LlavaJsonExamples, Order, SyntheticExamples, count_targets
from .data_synthetic import QUESTION_TYPES, TRAIN_DOT_SIZES
from .model import default_model_and_processor, load_model_and_processor, save_run_model
from .progress import Progress

log = logging.getLogger("fastnest.train")
SYNTHETIC_EVAL_SEED = 1_000_003  # the evaluation split's images never appear in training (seed 0 + index)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _settings(cfg: TrainConfig, spec: MatryoshkaScales) -> dict:
    return {
        "scales": list(spec.scales),
        "grid": spec.grid,
        "template": "llava_v1",
        "system": cfg.system,
        "max_length": cfg.max_length,
        "fastnest_version": __version__,
    }


def _examples(cfg: TrainConfig, total_positions: int, bad: BadSamples):
    if cfg.data is None:
        examples = SyntheticExamples(
            max(1, total_positions), seed=cfg.seed, turns=cfg.synthetic_turns, dot_sizes=TRAIN_DOT_SIZES
        )
        return examples, False
    return LlavaJsonExamples(cfg.data, cfg.image_folder, bad), True


def _eval_examples(cfg: TrainConfig, bad: BadSamples):
    if cfg.eval_data is not None:
        return LlavaJsonExamples(cfg.eval_data, cfg.eval_image_folder, bad)
    if cfg.data is None:
        return SyntheticExamples(cfg.eval_samples, seed=SYNTHETIC_EVAL_SEED + cfg.seed, turns=1)
    return None


@dataclass
class _Run:
    """A run as the loop sees it, set up once by ``_setup``."""

    cfg: TrainConfig
    d: distributed.Dist
    strategy: str
    run_dir: Path
    model: torch.nn.Module
    wrapped: torch.nn.Module
    processor: object
    spec: MatryoshkaScales
    examples: object
    order: Order
    collate: Collator
    steps: int
    world_batch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    bad_load: BadSamples  # bad rows found when the data was read (every process reads it; one reports)
    bad: BadSamples  # bad rows found when used
    start: int = 0
    wall_before: float = 0.0  # training time before a resume
    cpu_before: float = 0.0


def train(cfg: TrainConfig) -> dict:
    """Run training (and the analysis at the end); return the run summary (also written as summary.json)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    d = distributed.init(cfg.device)
    try:
        run = _setup(cfg, d)
        train_wall0 = time.perf_counter()
        _loop(run, train_wall0, cpu0)
        return _finish(run, wall0, cpu0, time.perf_counter() - train_wall0)
    finally:
        distributed.shutdown(d)


def _load(cfg: TrainConfig, resume_from: Path | None):
    """The model (patched with the run's scales) and processor to train."""
    if resume_from is not None:
        model, processor = load_model_and_processor(resume_from / "model")
    elif cfg.model is not None:
        model, processor = load_model_and_processor(cfg.model)
    else:
        model, processor = default_model_and_processor(cfg.seed)
    patch(model, scales=cfg.scales)
    return model, processor


def _prepare(model, cfg: TrainConfig, d: distributed.Dist) -> None:
    """Freeze what gets no gradient, move to the device, checkpointing, train mode."""
    patch_state(model).adapter.freeze_unread_vision(model)
    model.to(d.device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def _setup(cfg: TrainConfig, d: distributed.Dist) -> _Run:
    strategy = distributed.resolve_strategy(cfg.strategy, d)
    resume_from = checkpoint.find(cfg.resume) if cfg.resume else None
    run_dir = checkpoint.run_dir_of(resume_from) if resume_from is not None else Path(cfg.output_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint.remove_partial(run_dir):
            log.warning("removed %s (left by a save that did not finish)", stale)
    d.barrier()
    _seed_everything(cfg.seed)
    model, processor = _load(cfg, resume_from)
    state = patch_state(model)
    _prepare(model, cfg, d)
    world_batch = cfg.batch_size * d.world * cfg.grad_accum
    bad_load = BadSamples(cfg.on_bad_sample, quiet=not d.main)
    examples, shuffle = _examples(cfg, (cfg.steps or DEFAULT_STEPS) * world_batch, bad_load)
    if len(examples) == 0:
        raise ValueError(f"--data {cfg.data}: no usable rows")
    steps = cfg.steps or (DEFAULT_STEPS if cfg.data is None else math.ceil(len(examples) / world_batch))
    collate = Collator(processor, state.spec.tokens_per_image, cfg.max_length, cfg.system)
    if collate.image_token_id != state.adapter.image_token_id(model):
        raise ValueError(
            f"the processor's image token has id {collate.image_token_id} but the model's image token id is "
            f"{state.adapter.image_token_id(model)}; save the matching processor beside the model"
        )
    for part, params in state.adapter.parameter_groups(model).items():
        if part in cfg.freeze:
            for p in params:
                p.requires_grad_(False)
    wrapped = distributed.wrap(model, strategy, d, cfg.bf16)
    opt = optim.optimizer(state.adapter.parameter_groups(model), cfg)
    run = _Run(
        cfg,
        d,
        strategy,
        run_dir,
        model,
        wrapped,
        processor,
        state.spec,
        examples,
        Order(len(examples), shuffle, cfg.seed),
        collate,
        steps,
        world_batch,
        opt,
        optim.scheduler(opt, min(cfg.warmup_steps, steps), steps),
        bad_load,
        BadSamples(cfg.on_bad_sample),
    )
    if resume_from is not None:
        _resume(run, resume_from)
    if d.main:
        _truncate_metrics(run_dir / "metrics.jsonl", run.start)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")
    return run


def _resume(run: _Run, resume_from: Path) -> None:
    progress = checkpoint.load_state(resume_from, run.optimizer, run.scheduler, run.strategy, run.wrapped, run.d)
    run.start = progress["step"]
    run.wall_before, run.cpu_before = progress.get("wall_s", 0.0), progress.get("cpu_s", 0.0)
    run.bad.counts.update(progress.get("bad", {}))
    if run.d.main:
        log.info("resumed from %s at step %d", resume_from, run.start)


def _loop(run: _Run, train_wall0: float, cpu0: float) -> None:
    cfg, d = run.cfg, run.d
    autocast = (
        torch.autocast(d.device.type, dtype=torch.bfloat16)
        if cfg.bf16 and run.strategy != "fsdp"
        else contextlib.nullcontext()
    )
    bar = Progress(cfg.progress and d.main, run.steps, run.start, run.spec.scales)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    for step in range(run.start, run.steps):
        t0 = time.perf_counter()
        loss, per_scale, tokens = _optimizer_step(run, step, autocast, trainable)
        dt = time.perf_counter() - t0
        times = {
            "wall_s": run.wall_before + time.perf_counter() - train_wall0,
            "cpu_s": run.cpu_before + time.process_time() - cpu0,
        }
        if d.main:
            _append_metrics(run, step + 1, loss, per_scale, tokens, dt, times)
        bar.update(loss, per_scale, tokens / dt if dt > 0 else 0.0)
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == run.steps:
            _save(run, done, times)
    bar.close()


def _micro_batches(run: _Run, step: int) -> list:
    cfg, d = run.cfg, run.d
    micro = []
    for m in range(cfg.grad_accum):
        first = step * run.world_batch + (m * d.world + d.rank) * cfg.batch_size
        rows = [run.examples.example(run.order[p], run.bad) for p in range(first, first + cfg.batch_size)]
        micro.append(run.collate(rows, run.bad))
    return micro


def _optimizer_step(run: _Run, step: int, autocast, trainable) -> tuple[float, list[float], int]:
    """One optimizer step over the accumulated micro-batches; the loss, per-scale losses and language-model
    tokens, summed over processes."""
    cfg, d = run.cfg, run.d
    micro = _micro_batches(run, step)
    num_items = d.sum([sum(count_targets(b.inputs["labels"], b.inputs["attention_mask"]) for b in micro if b)])[0]
    loss_sum = torch.zeros((), dtype=torch.float64)
    scale_sum = torch.zeros(len(run.spec.scales), dtype=torch.float64)
    tokens = 0
    for m, batch in enumerate(micro if num_items else ()):  # no target in the whole global batch: no update
        inputs = batch.inputs if batch is not None else None
        if inputs is None and not d.enabled:
            continue
        if d.enabled and (inputs is None or "pixel_values" not in inputs):
            # Every process must run the same modules (DDP waits for every gradient, FSDP2 for every
            # all-gather): a label-free dummy image row costs a little and changes no gradient.
            inputs = with_dummy_row(inputs, patch_state(run.model).adapter.dummy_row(run.model))
        with _no_sync(run.wrapped, run.strategy, m == cfg.grad_accum - 1):
            inputs = {k: v.to(d.device) for k, v in inputs.items()}
            with autocast:
                out = run.wrapped(**inputs, num_items_in_batch=num_items)
            (out.loss * d.world).backward()
        loss_sum += out.loss.detach().double().cpu()
        scale_sum += out.scale_losses.double().cpu()
        tokens += out.lm_tokens
    if num_items == 0:
        log.warning("step %d: every row of the global batch was skipped; no update", step + 1)
    else:
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    reduced = d.sum([float(loss_sum), *scale_sum.tolist(), tokens])
    return reduced[0], reduced[1 : 1 + len(run.spec.scales)], int(reduced[-1])


def _append_metrics(
    run: _Run, step: int, loss: float, per_scale: list[float], tokens: int, dt: float, times: dict
) -> None:
    record = {
        "step": step,
        "loss": loss,
        "scale_losses": dict(zip(map(str, run.spec.scales), per_scale)),
        "lr": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
        "lm_tokens": tokens,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
        "step_s": dt,
        "samples_seen": step * run.world_batch,
        **times,
    }
    with (run.run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save(run: _Run, done: int, times: dict) -> None:
    progress = {"step": done, "samples_seen": done * run.world_batch, **times, "bad": dict(run.bad.counts)}
    checkpoint.save(
        run.run_dir,
        done,
        model=run.wrapped,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        processor=run.processor,
        settings=_settings(run.cfg, run.spec),
        progress=progress,
        strategy=run.strategy,
        d=run.d,
        keep=run.cfg.save_total_limit,
    )


def _bad_total(run: _Run) -> BadSamples:
    """Bad rows of the whole run: found when reading (once) plus found when used (summed over processes)."""
    total = BadSamples("skip", quiet=True)
    total.counts.update(run.bad_load.counts)
    for kind, n in zip(BAD_KINDS, run.d.sum([run.bad.counts[k] for k in BAD_KINDS])):
        total.counts[kind] += int(n)
    total.counts = +total.counts  # drop zero counts
    return total


def _finish(run: _Run, wall0: float, cpu0: float, train_wall: float) -> dict:
    """The final model, the analysis and summary.json."""
    cfg, d = run.cfg, run.d
    bad_total = _bad_total(run)
    final = run.run_dir / "model"
    saved = checkpoint.complete(run.run_dir)
    if d.main and saved:
        _replace_dir(saved[-1] / "model", final)
    elif d.main:  # no step ran in this process (resumed at the end): keep what is there
        save_run_model(run.model, run.processor, final, _settings(cfg, run.spec))
    d.barrier()
    summary = {
        "run_dir": str(run.run_dir),
        "steps": run.steps,
        "global_batch": run.world_batch,
        "processes": d.world,
        "strategy": run.strategy,
        "train_wall_s": run.wall_before + train_wall,
        "train_cpu_s": run.cpu_before + time.process_time() - cpu0,
        "bad_samples": dict(bad_total.counts),
        "bad_samples_total": bad_total.total,
    }
    if d.main:
        log.info("%s", bad_total.summary())
        eval_examples = _eval_examples(cfg, BadSamples(cfg.on_bad_sample))
        if cfg.analyze and eval_examples is not None:
            summary["report"] = _analyze(run, final, eval_examples)
        summary["total_wall_s"] = time.perf_counter() - wall0 + run.wall_before
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _analyze(run: _Run, final: Path, eval_examples) -> dict:
    from . import analyze, report

    result = analyze.analyze_model(
        final,
        eval_examples,
        batch_size=run.cfg.eval_batch_size,
        max_length=run.cfg.max_length,
        bad=BadSamples(run.cfg.on_bad_sample),
        type_order=QUESTION_TYPES,
        device=run.d.device,
    )
    title = f"Granularity analysis of {run.run_dir}"
    paths = report.write(result, run.run_dir, title=title)
    sys.stdout.write("\n" + report.markdown(result, title=title) + "\n")
    return {k: str(v) for k, v in paths.items()}


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
    return {**merged, "pixel_values": dummy["pixel_values"]}


def _no_sync(model, strategy: str, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if strategy == "ddp" and not last:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they are about to be re-run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temporary sibling and a rename."""
    import shutil

    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)
