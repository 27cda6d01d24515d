"""What ``fastnest route`` measures per sample: which scales answer it and the answer's log-likelihood at each
(the analysis' packed prefill), its routing features (the routing pass), and, on the held-out split, the greedy
answer at every scale with its confidence (for the cascade).

Splits of the built-in data: routing-train rows are ``SyntheticExamples(n, seed=ROUTE_TRAIN_SEED + seed)``,
held-out rows ``seed=ROUTE_HELDOUT_SEED + seed`` (``seed``: the run's); a sample depends only on (its split's
seed, its index), and these seeds differ from the training stream's (the run's seed) and the analysis split's
(``SYNTHETIC_EVAL_SEED + seed``), so no split shares a sample with another. With ``--data`` and no
``--eval-data``, a seeded permutation of the file's rows is cut into the two.

Greedy answers: ``generate`` at each scale from the prompt (the row up to its first answer token, left-padded),
``max_new_tokens`` at most. Confidence: the smallest probability among the answer's tokens up to and including
its end-of-sequence token (all of them when it does not stop). Rows must hold one question each (one answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
from ..hf.route import routing_features
from .analyze import answer_scores, collated_batches
from .data_llava import BadSamples, Collator, SyntheticExamples

ROUTE_TRAIN_SEED = 2_000_003
ROUTE_HELDOUT_SEED = 3_000_003


def synthetic_splits(train: int, heldout: int, seed: int) -> tuple[SyntheticExamples, SyntheticExamples]:
    return (
        SyntheticExamples(train, seed=ROUTE_TRAIN_SEED + seed, turns=1),
        SyntheticExamples(heldout, seed=ROUTE_HELDOUT_SEED + seed, turns=1),
    )


class Subset:
    """Some rows of an examples source (``__len__`` + ``example(i, bad)``), in the given order."""

    def __init__(self, examples, indices: list[int]) -> None:
        self.examples, self.indices = examples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def example(self, index: int, bad: BadSamples):
        return self.examples.example(self.indices[index], bad)


def split(examples, heldout_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded permutation of ``examples`` cut into (routing-train, held-out)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(len(order) * (1 - heldout_fraction))
    if not 0 < cut < len(order):
        raise ValueError(f"{len(order)} rows cannot be split into routing-train and held-out at {heldout_fraction}")
    return Subset(examples, order[:cut]), Subset(examples, order[cut:])


@dataclass
class RouteData:
    scales: tuple[int, ...]  # ascending; the columns below
    correct: torch.Tensor  # bool [N, K]
    loglik: torch.Tensor  # float64 [N, K]: log-likelihood of the reference answer
    features: torch.Tensor  # float32 [N, F]
    question_types: list[str]
    where: list[str]
    confidence: torch.Tensor | None = None  # [N, K]: the greedy answer's confidence (held-out only)
    greedy_correct: torch.Tensor | None = None  # bool [N, K]: the greedy answer is the reference
    seconds: float = 0.0


def prompts(inputs: dict, pad_id: int, where: list[str] | None = None) -> tuple[dict, list[torch.Tensor]]:
    """Each row's prompt (up to its first labelled token), left-padded, with its images; and each row's
    reference answer (the labelled tokens), for ``generate``. ValueError naming a row (``where``: how to name
    each) with several answers or none."""
    rows, answers = [], []
    for b in range(inputs["input_ids"].shape[0]):
        name = where[b] if where is not None else f"row {b}"
        valid = inputs["attention_mask"][b].bool()
        ids, labels = inputs["input_ids"][b][valid], inputs["labels"][b][valid]
        labelled = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if len(labelled) == 0:
            raise ValueError(f"{name}: no labelled answer")
        if int(labelled[-1] - labelled[0]) + 1 != len(labelled):
            raise ValueError(f"{name}: several answers; fastnest route scores one question per row")
        rows.append(ids[: int(labelled[0])])
        answers.append(labels[labelled])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    out = {"input_ids": ids, "attention_mask": mask}
    out.update({k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs})
    return out, answers


def greedy_answers(model, prompt: dict, answers, scale: int, max_new_tokens: int, tokenizer):
    """``(confidence [B], correct [B])`` of greedy decoding at ``scale`` (module docstring)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = model.generate(
        **prompt,
        scale=scale,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, prompt["input_ids"].shape[1] :].cpu()
    probs = torch.stack([torch.softmax(step.float(), dim=-1).cpu() for step in out.logits], dim=1)
    picked = probs.gather(2, new[:, : probs.shape[1], None])[..., 0]
    confidence, correct = [], []
    for b, answer in enumerate(answers):
        stops = (new[b] == eos).nonzero()
        length = int(stops[0]) + 1 if len(stops) else new.shape[1]
        confidence.append(float(picked[b, :length].min()))
        correct.append(torch.equal(new[b, :length], answer.cpu()))
    return torch.tensor(confidence), torch.tensor(correct)


@torch.no_grad()
def collect(
    model,
    processor,
    examples,
    *,
    spec,
    batch_size: int,
    max_length: int,
    system: str,
    bad: BadSamples,
    greedy: bool = False,
    max_new_tokens: int = 16,
    progress=None,
) -> RouteData:
    """``RouteData`` of every usable row of ``examples`` at every scale of ``spec`` (columns ascending)."""
    order = sorted(range(len(spec.scales)), key=lambda k: spec.scales[k])
    scales = tuple(spec.scales[k] for k in order)
    collate = Collator(processor, spec.tokens_per_image, max_length, system)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    parts: dict[str, list] = {k: [] for k in ("correct", "loglik", "features", "confidence", "greedy")}
    types, where = [], []
    try:
        for size, batch in collated_batches(examples, collate, batch_size, bad):
            prompt, answers = prompts(batch.inputs, collate.pad_id, batch.where)
            correct, loglik = answer_scores(model, batch, spec)
            parts["correct"].append(correct[:, order])
            parts["loglik"].append(loglik[:, order])
            inputs = {k: v.to(model.device) for k, v in batch.inputs.items()}
            parts["features"].append(routing_features(model, **inputs, scale=scales[0]))
            if greedy:
                prompt = {k: v.to(model.device) for k, v in prompt.items()}
                runs = [greedy_answers(model, prompt, answers, s, max_new_tokens, processor.tokenizer) for s in scales]
                parts["confidence"].append(torch.stack([c for c, _ in runs], dim=1))
                parts["greedy"].append(torch.stack([g for _, g in runs], dim=1))
            types.extend(batch.question_types)
            where.extend(batch.where)
            if progress is not None:
                progress(size)
    finally:
        model.train(was_training)
    if not where:
        raise ValueError(f"no row could be scored ({bad.summary()})")
    cat = lambda k: torch.cat(parts[k]) if parts[k] else None  # noqa: E731
    return RouteData(
        scales,
        cat("correct"),
        cat("loglik"),
        cat("features"),
        types,
        where,
        cat("confidence"),
        cat("greedy"),
        time.perf_counter() - start,
    )
