"""The training loop: a patched model, per-part learning rates, accumulation, DDP/FSDP2, checkpoints, analysis.

The loop talks to the model through its patch state and adapter (``fastnest.hf``): parameter groups, freezing,
shard units and the dummy row come from there; the step itself is the patched forward. Faults: a non-finite
step stops the run or is skipped (guards), a resume must match the checkpoint's options (resume), SIGINT/SIGTERM
checkpoint after the current step (signals), a full disk is named (storage).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..hf import patch, patch_state
from ..scales import TokenCounts
from ..version import __version__
from . import checkpoint, distributed, metrics, optim, resume, scaling
from .config import DEFAULT_STEPS, TrainConfig
from .data_llava import BAD_KINDS, BadSamples, Collator, LlavaJsonExamples, Order, SyntheticExamples
from .guards import NonFiniteError, NonFiniteGuard, nonfinite_parameters
from .model import (
    ARCH_OF,
    connector_of,
    default_model_and_processor,
    default_mqt_model_and_processor,
    default_next_model_and_processor,
    load_model_and_processor,
    save_run_model,
)
from .progress import Progress
from .query_counts import num_tokens_option, resolved_num_tokens
from .run_analysis import SYNTHETIC_EVAL_SEED, analyze_run, eval_examples
from .signals import Interrupted, StopRequest, stop_on_signals
from .storage import DiskFullError, check_output_dir, replace_dir, writing
from .update import StepStats, decide, finish_step, forward_backward, with_dummy_row

__all__ = ["SYNTHETIC_EVAL_SEED", "TrainConfig", "train", "with_dummy_row"]
log = logging.getLogger("fastnest.train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _settings(cfg: TrainConfig, spec: TokenCounts) -> dict:
    if cfg.connector == "mqt":  # an MQT-LLaVA: its M and what it trained on (the analysis shows log-spaced counts)
        counts = {"num_queries": spec.num_queries, "num_tokens": resolved_num_tokens(cfg.num_tokens, spec.num_queries)}
    else:
        counts = {"scales": list(spec.scales), "grid": spec.grid}
    return {
        "connector": cfg.connector,
        **counts,
        "template": "llava_v1",
        "system": cfg.system,
        "max_length": cfg.max_length,
        "fastnest_version": __version__,
    }


def _examples(cfg: TrainConfig, total_positions: int, bad: BadSamples):
    if cfg.data is None:
        examples = SyntheticExamples(max(1, total_positions), seed=cfg.seed, turns=cfg.synthetic_turns, curriculum=True)
        return examples, False
    return LlavaJsonExamples(cfg.data, cfg.image_folder, bad), True


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
    spec: TokenCounts  # the counts inference allows; a step's own are its output's ``scales``
    examples: object
    order: Order
    collate: Collator
    steps: int
    world_batch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    bad_load: BadSamples  # bad rows found when the data was read (every process reads it; one reports)
    bad: BadSamples  # bad rows found when used
    eval_examples: object = None  # read (and checked) before training; None: no analysis
    trajectory: dict = field(default_factory=dict)  # saved with each checkpoint (resume.py)
    guard: NonFiniteGuard | None = None
    scaler: scaling.LossScaler | None = None  # --fp16
    stop: StopRequest | None = None
    last_saved: Path | None = None  # the newest checkpoint of this run (all are finite)
    start: int = 0
    wall_before: float = 0.0  # training time before a resume
    cpu_before: float = 0.0


def train(cfg: TrainConfig) -> dict:
    """Run training (and the analysis at the end); return the run summary (also written as summary.json)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    d = distributed.init(cfg.device)
    run = None
    try:
        run = _setup(cfg, d)
        train_wall0 = time.perf_counter()
        with stop_on_signals() as run.stop:
            _loop(run, train_wall0, cpu0)
        return _finish(run, wall0, cpu0, time.perf_counter() - train_wall0)
    finally:
        # DDP's reducer holds the process group: freed after destroy_process_group, the group's destructor
        # joins gloo's worker thread while holding the GIL that thread needs (a hang at exit), so free it first
        del run
        gc.collect()
        distributed.shutdown(d)


def _load(cfg: TrainConfig, resume_from: Path | None, meta: bool = False):
    """The model (patched with the run's scales or token counts) and processor to train, its weights in
    ``--dtype``; ``meta``: built on the meta device, weights unread (FSDP2's ranks other than 0)."""
    dtype = getattr(torch, cfg.dtype)
    if resume_from is not None:
        model, processor = load_model_and_processor(resume_from / "model", dtype, meta)
    elif cfg.model is not None:
        model, processor = load_model_and_processor(cfg.model, dtype, meta)
    elif cfg.connector == "mqt":
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, processor = default_mqt_model_and_processor(cfg.seed, cfg.num_queries, cfg.query_keys)
        model.to(dtype)
    else:
        build = default_next_model_and_processor if cfg.arch == "llava-next" else default_model_and_processor
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, processor = build(cfg.seed)
        model.to(dtype)
    source = f"--resume {resume_from}" if resume_from is not None else f"--model {cfg.model}"
    arch = ARCH_OF.get(model.config.model_type)
    if cfg.arch is not None and arch != cfg.arch:
        raise ValueError(
            f"{source} is a {model.config.model_type!r} model, not --arch {cfg.arch}: drop --arch (the model's "
            f"family is its own) or pass another model"
        )
    if connector_of(model) != cfg.connector:
        raise ValueError(
            f"{source} is a {model.config.model_type!r} model, trained with --connector "
            f"{connector_of(model)}; got --connector {cfg.connector}: pass --connector {connector_of(model)} or "
            f"another model"
        )
    if cfg.connector == "pooled":
        return patch(model, scales=cfg.scales, sampling=cfg.scale_sampling, seed=cfg.seed), processor
    num_tokens = resolved_num_tokens(cfg.num_tokens, model.config.num_queries)
    try:  # "released" and "random:K" draw each step's counts from --seed: the same on every process
        return patch(model, num_tokens=num_tokens_option(num_tokens), seed=cfg.seed), processor
    except ValueError as e:
        raise ValueError(f"--num-tokens {num_tokens}: {e}") from None


def _prepare(model, cfg: TrainConfig, d: distributed.Dist, strategy: str) -> None:
    """Freeze what gets no gradient, move to the device (FSDP2: not here; ``distributed.wrap`` moves the
    shards), checkpointing, train mode."""
    patch_state(model).adapter.freeze_unread_vision(model)
    if strategy != "fsdp":
        model.to(d.device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def _setup(cfg: TrainConfig, d: distributed.Dist) -> _Run:
    strategy = distributed.resolve_strategy(cfg.strategy, d)
    scaling.check_strategy(cfg.fp16, strategy)
    resume_from = checkpoint.find(cfg.resume) if cfg.resume else None
    run_dir = checkpoint.run_dir_of(resume_from) if resume_from is not None else Path(cfg.output_dir)
    trajectory = resume.trajectory(cfg)
    accepted = resume.check(resume_from, trajectory, cfg.resume_override) if resume_from is not None else []
    if d.main:
        _open_run_dir(run_dir, "--resume" if resume_from is not None else "--output-dir")
    d.barrier()
    _seed_everything(cfg.seed)
    # FSDP2: only rank 0 reads the weights; the others build the model on the meta device (no host copy)
    model, processor = _load(cfg, resume_from, meta=strategy == "fsdp" and not d.main)
    state = patch_state(model)
    _prepare(model, cfg, d, strategy)
    world_batch = cfg.batch_size * d.world * cfg.grad_accum
    bad_load = BadSamples(cfg.on_bad_sample, quiet=not d.main)
    examples, shuffle = _examples(cfg, (cfg.steps or DEFAULT_STEPS) * world_batch, bad_load)
    if len(examples) == 0:
        raise ValueError(f"--data {cfg.data}: no usable rows")
    evaluation = eval_examples(cfg) if d.main else None  # checked now, not after the training time is spent
    steps = cfg.steps or (DEFAULT_STEPS if cfg.data is None else math.ceil(len(examples) / world_batch))
    collate = Collator(processor, state.spec.tokens_per_image, cfg.max_length, cfg.system)
    _check_and_freeze(model, collate, cfg)
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
        evaluation,
        guard=NonFiniteGuard(cfg.max_nonfinite_skips),
        scaler=scaling.LossScaler(d.device, opt) if cfg.fp16 else None,
    )
    if resume_from is not None:
        _resume(run, resume_from)
    run.trajectory = {**trajectory, "overrides": resume.history(resume_from, accepted, run.start)}
    if d.main:
        metrics.truncate(run_dir / "metrics.jsonl", run.start)
        with writing("the run's config", run_dir):
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")
    return run


def _open_run_dir(run_dir: Path, flag: str) -> None:
    check_output_dir(run_dir, flag)
    for stale in checkpoint.remove_partial(run_dir):
        log.warning("removed %s (left by a save that did not finish)", stale)


def _check_and_freeze(model, collate: Collator, cfg: TrainConfig) -> None:
    """The processor's image token is the model's; the frozen parts get no gradient."""
    adapter = patch_state(model).adapter
    if collate.image_token_id != adapter.image_token_id(model):
        raise ValueError(
            f"the processor's image token has id {collate.image_token_id} but the model's image token id is "
            f"{adapter.image_token_id(model)}; save the matching processor beside the model"
        )
    for part, params in adapter.parameter_groups(model).items():
        if part in cfg.freeze:
            for p in params:
                p.requires_grad_(False)


def _resume(run: _Run, resume_from: Path) -> None:
    progress = checkpoint.load_state(
        resume_from, run.optimizer, run.scheduler, run.strategy, run.wrapped, run.d, run.scaler
    )
    run.start, run.last_saved = progress["step"], resume_from
    run.wall_before, run.cpu_before = progress.get("wall_s", 0.0), progress.get("cpu_s", 0.0)
    run.bad.counts.update(progress.get("bad", {}))
    if run.d.main:
        log.info("resumed from %s at step %d", resume_from, run.start)


def _loop(run: _Run, train_wall0: float, cpu0: float) -> None:
    cfg, d = run.cfg, run.d
    autocast = scaling.autocast(d.device, cfg.bf16, cfg.fp16, run.strategy)
    bar = Progress(cfg.progress and d.main, run.steps, run.start)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    for step in range(run.start, run.steps):
        t0 = time.perf_counter()
        stats = forward_backward(run, step, autocast, trainable)
        applied = _decide(run, step, stats)
        finish_step(run, applied)
        dt = time.perf_counter() - t0
        times = {
            "wall_s": run.wall_before + time.perf_counter() - train_wall0,
            "cpu_s": run.cpu_before + time.process_time() - cpu0,
        }
        if d.main:
            _append_metrics(run, step + 1, stats, dt, times, skipped=not applied and stats.num_items > 0)
        bar.update(stats.loss, stats.scale_losses, stats.tokens / dt if dt > 0 else 0.0)
        done = step + 1
        stopping = _stop_requested(run)
        if (cfg.save_every and done % cfg.save_every == 0) or done == run.steps or stopping:
            _save(run, done, times)
        if stopping:
            bar.close()
            raise _interrupted(run, done)
    bar.close()


def _decide(run: _Run, step: int, stats: StepStats) -> bool:
    """``update.decide``; a stopping step's numbers are still written to the metrics."""
    try:
        return decide(run, step, stats)
    except NonFiniteError:
        if run.d.main:
            _append_metrics(run, step + 1, stats, 0.0, {}, skipped=True)
        raise


def _stop_requested(run: _Run) -> bool:
    """A signal reached any process (every process stops after the same step)."""
    asked = run.stop is not None and run.stop.signum is not None
    return bool(run.d.sum([float(asked)])[0]) if run.d.enabled else asked


def _interrupted(run: _Run, done: int) -> Interrupted:
    import signal

    signum = run.stop.signum if run.stop is not None and run.stop.signum is not None else signal.SIGTERM
    name = signal.Signals(signum).name
    return Interrupted(
        f"{name}: stopped after step {done} of {run.steps}; checkpoint {run.last_saved} written. Resume with the "
        f"same options plus --resume {run.run_dir}",
        signum,
    )


def _append_metrics(run: _Run, step: int, stats: StepStats, dt: float, times: dict, skipped: bool) -> None:
    record = {
        "step": step,
        "loss": stats.loss,
        "scale_losses": {str(s): v for s, v in stats.scale_losses.items()},  # keyed by this step's counts
        "lr": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
        "grad_norm": stats.grad_norm,
        "lm_tokens": stats.tokens,
        "tokens_per_s": stats.tokens / dt if dt > 0 else 0.0,
        "step_s": dt,
        "samples_seen": step * run.world_batch,
        **times,
    }
    if skipped:
        record["skipped"] = True
    path = run.run_dir / "metrics.jsonl"
    with writing("metrics", path, _still_there(run)):
        metrics.append(path, record)


def _still_there(run: _Run) -> str:
    if run.last_saved is None:
        return "; no checkpoint was written yet"
    return f"; checkpoint {run.last_saved} is intact, resume with --resume {run.run_dir}"


def _save(run: _Run, done: int, times: dict) -> None:
    bad = nonfinite_parameters(distributed.unwrap(run.wrapped))
    if run.d.sum([float(len(bad))])[0]:
        kept = f"the last finite checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint was written"
        raise NonFiniteError(
            f"step {done}: parameter(s) not finite ({', '.join(bad[:3]) or 'on another process'}); checkpoint "
            f"step {done} not written, {kept}. Lower --lr"
        )
    progress = {"step": done, "samples_seen": done * run.world_batch, **times, "bad": dict(run.bad.counts)}
    try:
        with writing(f"checkpoint step {done}", run.run_dir / checkpoint.CHECKPOINTS, _still_there(run)):
            run.last_saved = checkpoint.save(
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
                trajectory=run.trajectory,
                scaler=run.scaler,
            )
    except DiskFullError:
        if run.d.main:
            checkpoint.remove_partial(run.run_dir)  # give the space of the partial save back
        raise


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
    with writing("the final model", final, _still_there(run)):
        if d.main and saved:
            replace_dir(saved[-1] / "model", final)
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
        "resume_overrides": run.trajectory.get("overrides", []),
    }
    if d.main:
        log.info("%s", bad_total.summary())
        if run.eval_examples is not None:
            summary["report"] = analyze_run(run, final, run.eval_examples)
        summary["total_wall_s"] = time.perf_counter() - wall0 + run.wall_before
        with writing("summary.json", run.run_dir):
            (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
