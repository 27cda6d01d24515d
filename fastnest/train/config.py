"""The options of a training run (``fastnest train``'s flags), checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import DEFAULT_SCALES
from ..hf.adapter import PARTS
from .template import SYSTEM_V1


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
