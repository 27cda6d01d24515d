"""The released M3 evaluation workflow as a plain function: one padded pass per scale, full logits.

What the released repository's evaluation does for each scale (``matryoshka_vis_token_scale=s``): the vision
tower and projector again, the features average-pooled to ``s`` tokens and spliced into each row in place of
the image's placeholders (tools/m3_reference.py), the batch right-padded, the full language model, full fp32
logits over the whole vocabulary. Scored teacher-forced: a sample is correct at a scale when the argmax at
every labelled position is the reference token, the correctness matrix ``[samples, scales]`` that
``fastnest.train.analyze.evaluate`` gives from one packed prefill. Written against the UNPATCHED Hugging Face
model; only the batching (``released_evaluate``) uses fastnest's collator, so both workflows score the very
same padded batches.

The released repository evaluates one scale per run (``matryoshka_vis_token_scale`` is a model argument of
each evaluation), so every scale's pass reads and preprocesses the data again: ``released_evaluate`` does that
by default. ``shared_batches=True`` collates each batch once for all its scales, which the released workflow
does not do (a faster reference: the analysis benchmark times both).
"""

from __future__ import annotations

import torch

from tools.m3_reference import padded_labels, padded_logits, scaled_rows


@torch.no_grad()
def released_correct(
    model, input_ids, attention_mask, labels, pixel_values=None, *, scales: tuple[int, ...]
) -> torch.Tensor:
    """bool ``[rows, scales]``: every labelled token of the row is the argmax of its scale's padded pass."""
    columns = []
    for scale in scales:
        embeds, labs, _ = scaled_rows(model, input_ids, attention_mask, pixel_values, labels, scale)
        logits, target = padded_logits(model, embeds), padded_labels(labs)
        predicted = logits[:, :-1].argmax(-1)  # position p predicts token p + 1
        target = target[:, 1:]
        labelled = target != -100
        if not bool(labelled.any(dim=1).all()):
            raise ValueError(f"row {int((~labelled.any(dim=1)).nonzero()[0])}: no labelled answer token to score")
        columns.append(((predicted == target) | ~labelled).all(dim=1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def released_evaluate(
    model,
    processor,
    examples,
    *,
    batch_size: int,
    max_length: int,
    system: str,
    bad,
    scales: tuple[int, ...],
    shared_batches: bool = False,
) -> torch.Tensor:
    """bool ``[samples, scales]`` over ``examples`` (``__len__`` + ``example(i, bad)``), batched as
    ``evaluate`` batches them (same collator, same order): one pass over the data per scale, or with
    ``shared_batches`` one pass whose batches run every scale."""
    from fastnest.train.analyze import collated_batches
    from fastnest.train.data_llava import Collator

    vision = model.config.vision_config
    collate = Collator(processor, (vision.image_size // vision.patch_size) ** 2, max_length, system)

    def one_pass(pass_scales: tuple[int, ...]) -> torch.Tensor:
        rows = [
            released_correct(model, **batch.inputs, scales=pass_scales)
            for _, batch in collated_batches(examples, collate, batch_size, bad)
        ]
        return torch.cat(rows) if rows else torch.zeros(0, len(pass_scales), dtype=torch.bool)

    was_training = model.training
    model.eval()
    try:
        if shared_batches:
            return one_pass(tuple(scales))
        return torch.cat([one_pass((scale,)) for scale in scales], dim=1)
    finally:
        model.train(was_training)
