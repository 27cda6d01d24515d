"""The training loop: patched LLaVA, per-part learning rates, accumulation, DDP/FSDP2, checkpoints, analysis."""

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

from .. import patch_llava
from ..packing import IGNORE_INDEX
from ..scales import DEFAULT_SCALES, MatryoshkaScales
from . import checkpoint, distributed
from .data_llava import BAD_KINDS, BadSamples, Collator, LlavaJsonExamples, SyntheticExamples, count_targets
from .data_synthetic import QUESTION_TYPES, TRAIN_DOT_SIZES
from .model import default_model_and_processor, load_model_and_processor, save_run_model
from .template import SYSTEM_V1

log = logging.getLogger("fastnest.train")
PARTS = ("vision", "projector", "lm")
SYNTHETIC_EVAL_SEED = 1_000_003  # the evaluation split's images never appear in training (seed 0 + index)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    model: str | None = None  # Hugging Face LLaVA directory; None: the built-in tiny model
    data: str | None = None  # LLaVA conversation JSON / JSONL; None: the built-in synthetic set
    image_folder: str | None = None
    eval_data: str | None = None
    eval_image_folder: str | None = None
    scales: tuple[int, ...] = DEFAULT_SCALES
    steps: int | None = None  # default: 1 epoch of --data, or the built-in run's length
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 2e-3
    lr_vision: float | None = None
    lr_projector: float | None = None
    lr_lm: float | None = None
    freeze: tuple[str, ...] | None = None  # None: ("vision",) for the built-in model, () with --model
    weight_decay: float = 0.0
    warmup_steps: int = 30
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_length: int = 2048
    save_every: int = 0  # 0: only at the end
    save_total_limit: int = 2
    resume: str | None = None
    seed: int = 0
    on_bad_sample: str = "fail"
    strategy: str = "auto"
    device: str = "auto"
    system: str = SYSTEM_V1
    synthetic_turns: int = 4
    eval_samples: int = 400
    eval_batch_size: int = 16
    analyze: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.scales = tuple(self.scales)
        if self.freeze is None:
            # The built-in tower stays at its random init: trained from scratch, its features of the colours that
            # only the rare questions need collapsed onto the background colours' (LLaVA keeps CLIP frozen too).
            self.freeze = ("vision",) if self.model is None else ()
        self.freeze = tuple(self.freeze)
        for part in self.freeze:
            if part not in PARTS:
                raise ValueError(f"--freeze {part!r}: parts are {PARTS}")
        if len(self.freeze) == len(PARTS):
            raise ValueError(f"--freeze {','.join(self.freeze)} leaves nothing to train")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if self.data is None and self.image_folder is not None:
            raise ValueError("--image-folder needs --data")


DEFAULT_STEPS = 2000  # the built-in run: about 7 minutes on 2 CPU cores


def _parts(model) -> dict[str, list[torch.nn.Parameter]]:
    inner = model.model
    groups = {
        "vision": list(inner.vision_tower.parameters()),
        "projector": list(inner.multi_modal_projector.parameters()),
        "lm": list(inner.language_model.parameters()),
    }
    seen = {id(p) for ps in groups.values() for p in ps}
    groups["lm"] += [p for p in model.lm_head.parameters() if id(p) not in seen]  # tied heads are counted once
    return groups


def _freeze_unread_vision(model) -> None:
    """LLaVA reads the tower's ``vision_feature_layer`` output: later layers and the post-norm never get a
    gradient (DDP would wait for them forever); freeze them."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    post = getattr(tower, "post_layernorm", None) or getattr(tower.vision_model, "post_layernorm", None)
    layer = model.config.vision_feature_layer
    deepest = max(i % (len(encoder.layers) + 1) for i in ([layer] if isinstance(layer, int) else layer))
    for unread in [*encoder.layers[deepest:], post]:
        if unread is not None:
            unread.requires_grad_(False)


def _freeze(model, parts: tuple[str, ...]) -> None:
    for part, params in _parts(model).items():
        if part in parts:
            for p in params:
                p.requires_grad_(False)


def _optimizer(model, cfg: TrainConfig):
    """AdamW with one parameter group per trainable part. Built after wrapping: FSDP2 replaces parameters."""
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "lm": cfg.lr_lm}
    groups = []
    for part, params in _parts(model).items():
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": lrs[part] if lrs[part] is not None else cfg.lr, "name": part})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def _scheduler(optimizer, warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Order:
    """Which example each global position reads: epoch-wise permutations (or the identity), fixed by the seed,
    so the data position of a run is just the number of positions consumed."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[offset]


def _lm_tokens(inputs: dict, image_token_id: int, spec: MatryoshkaScales) -> int:
    """Tokens of the packed language-model pass: text once per scale for rows with images, every scale's
    visual tokens per image, text-only rows once."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    images = ((ids == image_token_id) & mask).sum(1) // spec.tokens_per_image
    text = mask.sum(1) - images * spec.tokens_per_image
    with_images = images > 0
    per_row = torch.where(with_images, text * len(spec.scales) + images * spec.total, text)
    return int(per_row.sum())


def _settings(cfg: TrainConfig, spec: MatryoshkaScales) -> dict:
    return {
        "scales": list(spec.scales),
        "grid": spec.grid,
        "template": "llava_v1",
        "system": cfg.system,
        "max_length": cfg.max_length,
        "fastnest_version": __import__("fastnest").__version__,
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


class _Progress:
    """A live line: step, loss per scale, tokens/s (tqdm when available and wanted)."""

    def __init__(self, enabled: bool, total: int, initial: int, scales) -> None:
        self.scales, self.bar = scales, None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, per_scale: list[float], tok_s: float) -> None:
        if self.bar is None:
            return
        losses = " ".join(f"{s}:{v:.3f}" for s, v in zip(self.scales, per_scale))
        self.bar.set_postfix_str(f"loss {loss:.3f} [{losses}] {tok_s / 1000:.1f}k tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig) -> dict:
    """Run training (and the analysis at the end); return the run summary (also written as summary.json)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    d = distributed.init(cfg.device)
    try:
        return _train(cfg, d, wall0, cpu0)
    finally:
        distributed.shutdown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, wall0: float, cpu0: float) -> dict:
    strategy = distributed.resolve_strategy(cfg.strategy, d)
    resume_from = checkpoint.find(cfg.resume) if cfg.resume else None
    run_dir = checkpoint.run_dir_of(resume_from) if resume_from is not None else Path(cfg.output_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint.remove_partial(run_dir):
            log.warning("removed %s (left by a save that did not finish)", stale)
    d.barrier()

    _seed_everything(cfg.seed)
    if resume_from is not None:
        model, processor = load_model_and_processor(resume_from / "model")
    elif cfg.model is not None:
        model, processor = load_model_and_processor(cfg.model)
    else:
        model, processor = default_model_and_processor(cfg.seed)
    patch_llava(model, scales=cfg.scales)
    spec = model._fastnest.spec
    _freeze_unread_vision(model)
    model.to(d.device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    world_batch = cfg.batch_size * d.world * cfg.grad_accum
    bad_load = BadSamples(cfg.on_bad_sample, quiet=not d.main)  # every process reads the file; one reports
    bad = BadSamples(cfg.on_bad_sample)
    provisional = cfg.steps or DEFAULT_STEPS
    examples, shuffle = _examples(cfg, provisional * world_batch, bad_load)
    if len(examples) == 0:
        raise ValueError(f"--data {cfg.data}: no usable rows")
    steps = cfg.steps or (DEFAULT_STEPS if cfg.data is None else math.ceil(len(examples) / world_batch))
    order = Order(len(examples), shuffle, cfg.seed)
    collate = Collator(processor, spec.tokens_per_image, cfg.max_length, cfg.system)
    image_token_id = collate.image_token_id
    if image_token_id != model.config.image_token_id:
        raise ValueError(
            f"the processor's image token has id {image_token_id} but the model's config.image_token_id is "
            f"{model.config.image_token_id}; save the matching processor beside the model"
        )

    _freeze(model, cfg.freeze)
    wrapped = distributed.wrap(model, strategy, d, cfg.bf16)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, min(cfg.warmup_steps, steps), steps)
    start, samples_seen, wall_before, cpu_before = 0, 0, 0.0, 0.0
    if resume_from is not None:
        progress = checkpoint.load_state(resume_from, optimizer, scheduler, strategy, wrapped, d)
        start, samples_seen = progress["step"], progress["samples_seen"]
        wall_before, cpu_before = progress.get("wall_s", 0.0), progress.get("cpu_s", 0.0)
        bad.counts.update(progress.get("bad", {}))
        if d.main:
            log.info("resumed from %s at step %d", resume_from, start)
    settings = _settings(cfg, spec)
    metrics_path = run_dir / "metrics.jsonl"
    if d.main:
        _truncate_metrics(metrics_path, start)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")

    autocast = (
        torch.autocast(d.device.type, dtype=torch.bfloat16)
        if cfg.bf16 and strategy != "fsdp"
        else contextlib.nullcontext()
    )
    bar = _Progress(cfg.progress and d.main, steps, start, spec.scales)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_wall0 = time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        micro = []
        for m in range(cfg.grad_accum):
            first = step * world_batch + (m * d.world + d.rank) * cfg.batch_size
            batch = collate([examples.example(order[p], bad) for p in range(first, first + cfg.batch_size)], bad)
            micro.append(batch)
        local_targets = sum(count_targets(b.inputs["labels"], b.inputs["attention_mask"]) for b in micro if b)
        num_items = d.sum([local_targets])[0]
        loss_sum = torch.zeros((), dtype=torch.float64)
        scale_sum = torch.zeros(len(spec.scales), dtype=torch.float64)
        tokens = 0
        for m, batch in enumerate(micro):
            if num_items == 0:  # every row of the global batch was skipped: nothing to learn from
                break
            last = m == cfg.grad_accum - 1
            inputs = batch.inputs if batch is not None else None
            if inputs is None and not d.enabled:
                continue
            if d.enabled and (inputs is None or "pixel_values" not in inputs):
                # Every process must run the same modules (DDP waits for every gradient, FSDP2 for every
                # all-gather): a label-free dummy image row costs a little and changes no gradient.
                inputs = _with_dummy_image(inputs, model.config, image_token_id, spec.tokens_per_image)
            with _no_sync(wrapped, strategy, last):
                inputs = {k: v.to(d.device) for k, v in inputs.items()}
                with autocast:
                    out = wrapped(**inputs, num_items_in_batch=num_items)
                (out.loss * d.world).backward()
            loss_sum += out.loss.detach().double().cpu()
            scale_sum += out.scale_losses.double().cpu()
            if batch is not None:
                tokens += _lm_tokens(batch.inputs, image_token_id, spec)
        if num_items == 0:
            log.warning("step %d: every row of the global batch was skipped; no update", step + 1)
        else:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        reduced = d.sum([float(loss_sum), *scale_sum.tolist(), tokens])
        loss, per_scale, tokens = reduced[0], reduced[1 : 1 + len(spec.scales)], int(reduced[-1])
        samples_seen = (step + 1) * world_batch
        dt = time.perf_counter() - t0
        if d.main:
            record = {
                "step": step + 1,
                "loss": loss,
                "scale_losses": dict(zip(map(str, spec.scales), per_scale)),
                "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "lm_tokens": tokens,
                "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "step_s": dt,
                "samples_seen": samples_seen,
                "wall_s": wall_before + time.perf_counter() - train_wall0,
                "cpu_s": cpu_before + time.process_time() - cpu0,
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(loss, per_scale, tokens / dt if dt > 0 else 0.0)
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == steps:
            progress = {
                "step": done,
                "samples_seen": samples_seen,
                "wall_s": wall_before + time.perf_counter() - train_wall0,
                "cpu_s": cpu_before + time.process_time() - cpu0,
                "bad": dict(bad.counts),
            }
            checkpoint.save(
                run_dir,
                done,
                model=wrapped,
                optimizer=optimizer,
                scheduler=scheduler,
                processor=processor,
                settings=settings,
                progress=progress,
                strategy=strategy,
                d=d,
                keep=cfg.save_total_limit,
            )
    bar.close()

    bad_total = BadSamples("skip", quiet=True)
    bad_total.counts.update(bad_load.counts)
    for kind, n in zip(BAD_KINDS, d.sum([bad.counts[k] for k in BAD_KINDS])):
        bad_total.counts[kind] += int(n)
    bad_total.counts = +bad_total.counts  # drop zero counts
    final = run_dir / "model"
    latest = checkpoint.complete(run_dir)[-1] if checkpoint.complete(run_dir) else None
    if d.main and latest is not None:
        _replace_dir(latest / "model", final)
    elif d.main:  # no step ran in this process (resumed at the end): keep what is there
        save_run_model(model, processor, final, settings)
    d.barrier()
    train_wall = time.perf_counter() - train_wall0
    summary = {
        "run_dir": str(run_dir),
        "steps": steps,
        "global_batch": world_batch,
        "processes": d.world,
        "strategy": strategy,
        "train_wall_s": wall_before + train_wall,
        "train_cpu_s": cpu_before + time.process_time() - cpu0,
        "bad_samples": dict(bad_total.counts),
        "bad_samples_total": bad_total.total,
    }
    if d.main:
        log.info("%s", bad_total.summary())
        eval_examples = _eval_examples(cfg, BadSamples(cfg.on_bad_sample))
        if cfg.analyze and eval_examples is not None:
            from . import analyze, report

            result = analyze.analyze_model(
                final,
                eval_examples,
                batch_size=cfg.eval_batch_size,
                max_length=cfg.max_length,
                bad=BadSamples(cfg.on_bad_sample),
                type_order=QUESTION_TYPES,
                device=d.device,
            )
            paths = report.write(result, run_dir, title=f"Granularity analysis of {run_dir}")
            summary["report"] = {k: str(v) for k, v in paths.items()}
            sys.stdout.write("\n" + report.markdown(result, title=f"Granularity analysis of {run_dir}") + "\n")
        summary["total_wall_s"] = time.perf_counter() - wall0 + wall_before
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _with_dummy_image(inputs: dict | None, config, image_token_id: int, tokens_per_image: int) -> dict:
    """``inputs`` plus one row holding a blank image and no labels (the batch's loss and gradients are unchanged)."""
    size = config.vision_config.image_size
    row = torch.tensor([image_token_id] * tokens_per_image + [0])
    pixels = torch.zeros(1, 3, size, size)
    if inputs is None:
        return {
            "input_ids": row[None],
            "attention_mask": torch.ones(1, len(row), dtype=torch.long),
            "labels": torch.full((1, len(row)), IGNORE_INDEX),
            "pixel_values": pixels,
        }
    width = max(inputs["input_ids"].shape[1], len(row))
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return {
        "input_ids": torch.cat([pad(inputs["input_ids"], 0), pad(row[None], 0)]),
        "attention_mask": torch.cat(
            [pad(inputs["attention_mask"], 0), pad(torch.ones(1, len(row), dtype=torch.long), 0)]
        ),
        "labels": torch.cat([pad(inputs["labels"], IGNORE_INDEX), torch.full((1, width), IGNORE_INDEX)]),
        "pixel_values": pixels,
    }


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
