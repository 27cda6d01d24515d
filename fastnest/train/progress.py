"""The live progress line of a training run."""

from __future__ import annotations


class Progress:
    """A live line: step, loss per token count of the step (one drawn count under MQT's ``released``), tokens/s
    (tqdm when available and wanted)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, per_count: dict[int, float], tok_s: float) -> None:
        if self.bar is None:
            return
        losses = " ".join(f"{s}:{v:.3f}" for s, v in per_count.items())
        self.bar.set_postfix_str(f"loss {loss:.3f} [{losses}] {tok_s / 1000:.1f}k tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
