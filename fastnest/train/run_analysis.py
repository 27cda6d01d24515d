"""The analysis at the end of a training run: its evaluation data (read and checked before training) and the
report beside the run."""

from __future__ import annotations

import sys
from pathlib import Path

from .data_llava import BadSamples, LlavaJsonExamples, SyntheticExamples
from .data_synthetic import DESIGNED_SCALES, QUESTION_TYPES

SYNTHETIC_EVAL_SEED = 1_000_003  # the evaluation split's images never appear in training (seed 0 + index)


def eval_examples(cfg):
    """The evaluation rows of ``cfg`` (None: no analysis); ValueError when ``--eval-data`` has none usable."""
    if not cfg.analyze:
        return None
    if cfg.eval_data is not None:
        examples = LlavaJsonExamples(cfg.eval_data, cfg.eval_image_folder, BadSamples(cfg.on_bad_sample), "--eval-data")
        if len(examples) == 0:
            raise ValueError(f"--eval-data {cfg.eval_data}: no usable rows")
        return examples
    if cfg.data is None:
        return SyntheticExamples(cfg.eval_samples, seed=SYNTHETIC_EVAL_SEED + cfg.seed, turns=1)
    return None


def analyze_run(run, final: Path, examples) -> dict:
    """Run the analysis of ``final`` (the run's model directory) and write the report into the run directory."""
    from . import analyze, report

    result = analyze.analyze_model(
        final,
        examples,
        batch_size=run.cfg.eval_batch_size,
        max_length=run.cfg.max_length,
        bad=BadSamples(run.cfg.on_bad_sample),
        type_order=QUESTION_TYPES,
        device=run.d.device,
        designed=DESIGNED_SCALES if isinstance(examples, SyntheticExamples) else None,
    )
    title = f"Granularity analysis of {run.run_dir}"
    paths = report.write(result, run.run_dir, title=title)
    sys.stdout.write("\n" + report.markdown(result, title=title) + "\n")
    return {k: str(v) for k, v in paths.items()}
