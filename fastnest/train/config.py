"""The options of a training run (``fastnest train``'s flags), checked when made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..constants import DEFAULT_SCALES
from ..hf.adapter import PARTS
from .query_counts import num_tokens_text
from .resume import check_override_names
from .scaling import check_precision
from .template import SYSTEM_V1

CONNECTORS = ("pooled", "mqt")  # LLaVA's projector pooled to scales (M3); a Matryoshka Query Transformer (MQT)
DEFAULT_NUM_QUERIES = 144  # the built-in MQT-LLaVA's M: log-spaced counts 2..144, a 12x12 query grid
QUERY_KEYS = ("positional", "features")
MQT_OPTIONS = ("num_tokens", "num_queries", "query_keys")
ARCHS = ("llava", "llava-next")  # the built-in pooled model: LLaVA-1.5 or LLaVA-NeXT (anyres)
SCALE_SAMPLING = ("all", "random")  # fastnest.hf.llava.SAMPLING, without importing the model code here


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    model: str | None = None  # Hugging Face LLaVA / MQT-LLaVA directory; None: the built-in tiny model
    connector: str = "pooled"  # "pooled": LLaVA-1.5 trained on pooled scales (M3); "mqt": MQT-LLaVA
    arch: str | None = None  # pooled: the built-in model's family (ARCHS; None: llava), or --model's, checked
    data: str | None = None  # LLaVA conversation JSON / JSONL; None: the built-in synthetic set
    image_folder: str | None = None
    eval_data: str | None = None
    eval_image_folder: str | None = None
    scales: tuple[int, ...] | None = None  # pooled only; None: DEFAULT_SCALES
    scale_sampling: str = "all"  # pooled: "all" scales each step (M3) or one "random" scale per step
    num_tokens: str | None = None  # mqt only (query_counts.py); None: the log-spaced counts up to M
    num_queries: int | None = None  # mqt, built-in model only; None: DEFAULT_NUM_QUERIES
    query_keys: str | None = None  # mqt, built-in model only: "positional" (the release, default) or "features"
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
    fp16: bool = False  # fp16 autocast with a grad scaler (fastnest.train.scaling)
    dtype: str = "float32"  # the weights' dtype when loaded (the master weights): float32 or bfloat16
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
    max_nonfinite_skips: int = 0  # non-finite steps skipped in a row before the run stops (0: stop at the first)
    resume_override: tuple[str, ...] = ()  # trajectory options allowed to differ from the checkpoint's on --resume

    def __post_init__(self) -> None:
        _check_connector_options(self)
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
        _check_values(self)
        if self.data is None and self.image_folder is not None:
            raise ValueError("--image-folder needs --data")


def _check_connector_options(cfg: TrainConfig) -> None:
    """Each connector's options only with it (naming the option and the fix); the defaults filled in."""
    if cfg.connector not in CONNECTORS:
        raise ValueError(f"--connector {cfg.connector!r}: choose one of {', '.join(CONNECTORS)}")
    if cfg.scale_sampling not in SCALE_SAMPLING:
        raise ValueError(f"--scale-sampling {cfg.scale_sampling!r}: choose one of {', '.join(SCALE_SAMPLING)}")
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise ValueError(f"--arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    if cfg.connector == "pooled":
        for name in MQT_OPTIONS:
            if getattr(cfg, name) is not None:
                raise ValueError(
                    f"{_flag(name)} is an option of --connector mqt (the query transformer); pass --connector mqt "
                    f"to train an MQT-LLaVA, or drop {_flag(name)} (the pooled connector's token counts are --scales)"
                )
        cfg.scales = tuple(DEFAULT_SCALES if cfg.scales is None else cfg.scales)
        return
    if cfg.arch is not None:
        raise ValueError(
            f"--arch {cfg.arch} is an option of --connector pooled (the pooled LLaVA families); --connector mqt "
            "trains an MQT-LLaVA: drop --arch"
        )
    if cfg.scale_sampling != "all":
        raise ValueError(
            "--scale-sampling random is an option of --connector pooled; with --connector mqt one token count per "
            "step is --num-tokens released (or random:K for K per step)"
        )
    if cfg.scales is not None:
        raise ValueError(
            "--scales is an option of --connector pooled (the pooled grid's scales); with --connector mqt the "
            "token counts are --num-tokens (e.g. 2,8,32,64, released or random:4)"
        )
    if cfg.num_tokens is not None:
        cfg.num_tokens = num_tokens_text(cfg.num_tokens)
    if cfg.model is not None:
        for name in ("num_queries", "query_keys"):
            if getattr(cfg, name) is not None:
                raise ValueError(
                    f"{_flag(name)} shapes the built-in MQT-LLaVA; the model of --model {cfg.model} has its own "
                    f"(its config.json): drop {_flag(name)}"
                )
        return
    cfg.num_queries = DEFAULT_NUM_QUERIES if cfg.num_queries is None else cfg.num_queries
    cfg.query_keys = "positional" if cfg.query_keys is None else cfg.query_keys
    if not isinstance(cfg.num_queries, int) or cfg.num_queries < 1:
        raise ValueError(f"--num-queries must be a positive integer, got {cfg.num_queries!r}")
    if cfg.query_keys not in QUERY_KEYS:
        raise ValueError(f"--query-keys {cfg.query_keys!r}: choose one of {', '.join(QUERY_KEYS)}")


def _check_values(cfg: TrainConfig) -> None:
    """Refuse values no run can use, naming the flag, the value and what is allowed."""
    for name in ("batch_size", "grad_accum", "max_length", "eval_samples", "eval_batch_size"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("warmup_steps", "save_every", "save_total_limit", "max_nonfinite_skips"):
        _at_least(name, getattr(cfg, name), 0)
    if cfg.steps is not None:
        _at_least("steps", cfg.steps, 1)
    if not 1 <= cfg.synthetic_turns <= 4:
        raise ValueError(f"--synthetic-turns must be in 1..4 (one question per type), got {cfg.synthetic_turns}")
    for name in ("lr", "lr_vision", "lr_projector", "lr_lm"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flag(name)} must be a finite positive number, got {value}")
    for name, off in (("weight_decay", ""), ("max_grad_norm", " (0 turns clipping off)")):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_flag(name)} must be a finite number >= 0{off}, got {value}")
    check_precision(cfg.dtype, cfg.bf16, cfg.fp16)
    cfg.resume_override = tuple(cfg.resume_override)
    check_override_names(cfg.resume_override)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        allowed = "positive" if low == 1 else f">= {low}"
        raise ValueError(f"{_flag(name)} must be {allowed}, got {value}")


DEFAULT_STEPS = 2000  # the built-in run: about 5 minutes on 2 CPU cores
