"""The Matryoshka plan: a padded multimodal batch as one packed sequence over every (row, scale).

Each image brings its own :class:`fastnest.layout.ImageLayout` (its placeholder count and its tokens per
scale), so images of different grids, crop counts or connectors share a batch. Everything here works on plain
tensors on the host (the attention backends want host-side lengths anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .constants import IGNORE_INDEX
from .layout import ImageLayout, check_layouts, pooled_grid
from .packing import PackedSequences, pack_sequences
from .scales import MatryoshkaScales


@dataclass(frozen=True)
class MatryoshkaPlan:
    """How a padded batch becomes one packed sequence over every (row, scale).

    The packed source is ``cat([text_embeds, visual])``: ``text_embeds`` embeds ``input_ids[text_mask]``
    (row-major) and ``visual`` stacks every image's rows (image ``i``'s ``layouts[i].rows`` rows, in image
    order; ``visual_offsets[i]`` is where they start). A row with images yields one sequence per scale (group
    = scale index); a row without images yields ONE sequence in group ``-1``, which counts towards every
    scale. With a shared prefix, a row's text before its first image is one more sequence (group ``-1``),
    packed just before the row's scale sequences, which have it as their context and hold only what follows
    it; when the first image's tokens at every scale begin its tokens at the largest (``ImageLayout.nested``:
    a query transformer's), those join the prefix too, and each scale's sequence continues the text and its
    own count of them. ``sequence_row[i]`` is the batch row of packed sequence ``i``.
    """

    text_mask: torch.Tensor  # bool [B, L]
    num_text: int
    num_images: int
    num_scales: int
    visual_offsets: tuple[int, ...]  # start of each image's rows within ``visual``
    num_visual_rows: int
    packed: PackedSequences
    sequence_row: tuple[int, ...]

    @property
    def num_source_rows(self) -> int:
        return self.num_text + self.num_visual_rows


def _runs(flags: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values in a 1-D bool tensor, as (start, end, value)."""
    if flags.numel() == 0:
        return []
    cuts = ((flags[1:] != flags[:-1]).nonzero().squeeze(1) + 1).tolist()
    bounds = [0, *cuts, flags.numel()]
    return [(a, b, bool(flags[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _check_labels(labels: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor) -> None:
    labelled = labels != IGNORE_INDEX
    for where, bad in (
        ("padding (attention_mask == 0)", labelled & ~valid),
        ("image placeholder", labelled & is_image),
    ):
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels must be {IGNORE_INDEX} at {where} positions: found {int(bad.sum())} labelled, "
                f"first at row {row}, column {col} (label {int(labels[row, col])}); set them to {IGNORE_INDEX}"
            )


def _host_inputs(input_ids, attention_mask, labels, image_token_id):
    """``(ids, valid, is_image, labels)`` on the host, checked: [B, L], left/right padding only, no labels at
    padding or placeholders."""
    ids = input_ids.detach().cpu()
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} differs from input_ids shape {tuple(ids.shape)}")
    holes = (valid[:, 1:].int() - valid[:, :-1].int() > 0).sum(1) > (~valid[:, 0]).int()
    if holes.any():
        raise ValueError(
            f"attention_mask row {int(holes.nonzero()[0])} has padding between tokens; only left or right padding "
            "is supported"
        )
    is_image = (ids == image_token_id) & valid
    lab = None
    if labels is not None:
        lab = labels.detach().cpu().long()
        if lab.shape != ids.shape:
            raise ValueError(f"labels shape {tuple(lab.shape)} differs from input_ids shape {tuple(ids.shape)}")
        _check_labels(lab, valid, is_image)
    return ids, valid, is_image, lab


def _row_runs(valid: torch.Tensor, is_image: torch.Tensor) -> list[list[tuple[torch.Tensor, bool]]]:
    """Per row: its maximal runs of text or of placeholders among the valid columns, as (columns, is_image)."""
    runs = []
    for b in range(valid.shape[0]):
        cols = valid[b].nonzero().squeeze(1)
        runs.append([(cols[start:end], img) for start, end, img in _runs(is_image[b, cols])])
    return runs


def _first_misfit(runs: list[list[tuple[torch.Tensor, bool]]], placeholders: Sequence[int]) -> str:
    """Where the placeholder runs and the images' counts first part ways, images taken in order (several in
    one run when adjacent): the image, the run it meets and the count it takes; "" when they agree."""
    image = 0
    for b, pieces in enumerate(runs):
        for cols, img in pieces:
            first, left = image, cols.numel() if img else 0
            while left and image < len(placeholders) and placeholders[image] <= left:
                left, image = left - placeholders[image], image + 1
            if not left:
                continue
            if first == len(placeholders):
                return f"; row {b} has {cols.numel()} placeholder tokens at column {int(cols[0])} after the last image"
            return (
                f"; image {first} (row {b}, column {int(cols[0])}) meets a run of {cols.numel()} placeholder tokens "
                f"where it takes {placeholders[first]}"
            )
    return f"; images {image} and on have no placeholders" if image < len(placeholders) else ""


def _count_error(have: int, layouts: Sequence[ImageLayout], unit: int | None, runs) -> ValueError:
    """The placeholders in ``input_ids`` are not those of the images given, in total."""
    if unit is not None and have % unit == 0:
        return ValueError(
            f"input_ids hold {have // unit} image placeholder blocks of {unit} tokens but {len(layouts)} images "
            "were given"
        )
    placeholders = [layout.placeholders for layout in layouts]
    return ValueError(
        f"input_ids hold {have} image placeholder tokens but the {len(layouts)} images given take "
        f"{sum(placeholders)}{_first_misfit(runs, placeholders)}"
    )


def _split_run(run: tuple[int, int, int], placeholders: Sequence[int], first: int, token_id: int) -> list[int]:
    """The images (indices into ``placeholders``, from ``first`` on) that a run of placeholders holds:
    ``run = (row, column, length)``; their placeholder counts must add up to its length exactly."""
    b, col, length = run
    images, left = [], length
    while left > 0 and first + len(images) < len(placeholders) and placeholders[first + len(images)] <= left:
        left -= placeholders[first + len(images)]
        images.append(first + len(images))
    if left:
        counts = list(placeholders[first : first + len(images) + 1])
        raise ValueError(
            f"row {b} has a run of {length} image placeholder tokens (id {token_id}) at column {col} that does not "
            f"split into whole images: the images from {first} on take {counts} placeholders"
        )
    return images


def _row_pieces(ids, valid, is_image, layouts, token_id: int, unit: int | None):
    """Per row: ``[(columns, images)]`` for each maximal run (``images`` empty for text).

    ``unit``: the placeholder count every image has, when known: runs are checked against it first."""
    runs = _row_runs(valid, is_image)
    for b, pieces in enumerate(runs):
        for cols, img in pieces:
            if img and unit is not None and cols.numel() % unit:
                raise ValueError(
                    f"row {b} has a run of {cols.numel()} image placeholder tokens (id {token_id}) at column "
                    f"{int(cols[0])}; each image must be exactly {unit} placeholders"
                )
    have = int(is_image.sum())
    if have != sum(layout.placeholders for layout in layouts):
        raise _count_error(have, layouts, unit, runs)
    placeholders = [layout.placeholders for layout in layouts]
    rows, image = [], 0
    for b, pieces in enumerate(runs):
        row = []
        for cols, img in pieces:
            images = _split_run((b, int(cols[0]), cols.numel()), placeholders, image, token_id) if img else []
            row.append((cols, images))
            image += len(images)
        rows.append(row)
    return rows


class _Sequences:
    """The sequences of a plan as they are added: sources, labels, groups, contexts, rows."""

    def __init__(self, labelled: bool) -> None:
        self.labelled = labelled
        self.sources, self.labels, self.groups, self.contexts, self.context_lens, self.rows = [], [], [], [], [], []

    def add(
        self, src: list[torch.Tensor], tgt: list, group: int, context: int, row: int, before: int = 0, keep=None
    ) -> int:
        """Add a sequence of its first ``keep`` tokens (None: all); with a context, it continues that sequence's
        first ``before`` tokens."""
        self.sources.append((torch.cat(src) if src else torch.zeros(0, dtype=torch.long))[:keep])
        self.labels.append((torch.cat(tgt) if self.labelled and tgt else torch.zeros(0, dtype=torch.long))[:keep])
        self.groups.append(group)
        self.contexts.append(context)
        self.context_lens.append(before if context >= 0 else 0)
        self.rows.append(row)
        return len(self.sources) - 1


def plan_matryoshka(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    image_token_id: int,
    layouts: Sequence[ImageLayout] | None = None,
    spec: MatryoshkaScales | None = None,
    num_images: int | None = None,
    share_prefix: bool = True,
    max_length: int | None = None,
) -> MatryoshkaPlan:
    """Plan the packed all-scale batch for processor-style inputs.

    ``input_ids [B, L]`` hold image ``i`` as ``layouts[i].placeholders`` placeholder tokens (adjacent images
    form one run; images are taken in order); padding (either side) is dropped via ``attention_mask``.
    ``spec`` + ``num_images`` is shorthand for ``num_images`` pooled square grids
    (``fastnest.layout.pooled_grid(spec)``). ``share_prefix`` (with two or more scales): a row's text before
    its first image is packed once, as the context of every scale's sequence; the result is the same.
    ``max_length``: each row keeps, at each scale, its first ``max_length`` tokens once its images are in (the
    original LLaVA code truncates there, to ``tokenizer_model_max_length``); None keeps every token.
    """
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(
            f"max_length must be a positive int (tokens per row at each scale) or None, got {max_length!r}"
        )
    if layouts is None:
        if spec is None or num_images is None:
            raise ValueError("plan_matryoshka needs layouts=, or spec= and num_images=")
        layouts = [pooled_grid(spec)] * num_images
    layouts = list(layouts)
    num_scales = check_layouts(layouts) or (len(spec.scales) if spec is not None else 1)
    ids, valid, is_image, lab = _host_inputs(input_ids, attention_mask, labels, image_token_id)
    text_mask = valid & ~is_image
    num_text = int(text_mask.sum())
    text_pos = torch.full(ids.shape, -1, dtype=torch.long)
    text_pos[text_mask] = torch.arange(num_text)
    sizes = {layout.placeholders for layout in layouts}
    unit = spec.tokens_per_image if spec is not None else (sizes.pop() if len(sizes) == 1 else None)
    rows = _row_pieces(ids, valid, is_image, layouts, image_token_id, unit)
    offsets, acc = [], num_text
    for layout in layouts:
        offsets.append(acc)
        acc += layout.rows
    seqs = _Sequences(lab is not None)
    share = share_prefix and num_scales > 1
    for b, pieces in enumerate(rows):
        _plan_row(seqs, b, pieces, text_pos, lab, layouts, offsets, num_scales, share, max_length)
    labels_ = seqs.labels if lab is not None else None
    packed = pack_sequences(seqs.sources, labels_, seqs.groups, seqs.contexts, seqs.context_lens)
    return MatryoshkaPlan(
        text_mask=text_mask,
        num_text=num_text,
        num_images=len(layouts),
        num_scales=num_scales,
        visual_offsets=tuple(o - num_text for o in offsets),
        num_visual_rows=acc - num_text,
        packed=packed,
        sequence_row=tuple(seqs.rows),
    )


def _plan_row(seqs: _Sequences, b, pieces, text_pos, lab, layouts, offsets, num_scales: int, share: bool, max_length):
    """Add row ``b``'s sequences: its shared prefix (if any), then one per scale (one in group -1 if text-only),
    each row at each scale cut to ``max_length`` tokens (prefix included)."""
    has_images = any(images for _, images in pieces)
    prefix, before = -1, [0] * num_scales
    if share and has_images:
        prefix, before = _shared_prefix(seqs, b, pieces, text_pos, lab, layouts, offsets, num_scales, max_length)
    for k in range(num_scales) if has_images else (-1,):
        src, tgt = [], []
        for cols, images in pieces:
            if not images:
                src.append(text_pos[b, cols])
                tgt.append(lab[b, cols] if lab is not None else None)
            for i in images:
                tokens = layouts[i].tokens[k]
                src.append(offsets[i] + tokens)
                tgt.append(torch.full((tokens.numel(),), IGNORE_INDEX, dtype=torch.long))
        keep = None if max_length is None else max_length - (before[k] if k >= 0 else 0)
        seqs.add(src, tgt, k, prefix, b, before[k] if k >= 0 else 0, keep)


def _shared_prefix(seqs: _Sequences, b, pieces, text_pos, lab, layouts, offsets, num_scales: int, max_length):
    """Pack what every scale's sequence of row ``b`` begins with, once (group -1: its targets count towards
    every scale), taking it off ``pieces``: the text before the first image (at most ``max_length`` tokens), and
    the first image's tokens at its largest scale when the other scales' tokens begin them (and the row is not
    cut inside them). Returns ``(prefix sequence or -1, how many of its tokens each scale continues)``."""
    src, tgt = [], []
    if not pieces[0][1]:
        cols = pieces.pop(0)[0][:max_length]
        src.append(text_pos[b, cols])
        tgt.append(lab[b, cols] if lab is not None else None)
    text = sum(t.numel() for t in src)
    before = [text] * num_scales
    cols, images = pieces[0]
    first = layouts[images[0]]
    if first.nested is not None and (max_length is None or text + first.count(first.nested) <= max_length):
        tokens = first.tokens[first.nested]
        src.append(offsets[images[0]] + tokens)
        tgt.append(torch.full((tokens.numel(),), IGNORE_INDEX, dtype=torch.long))
        before = [text + first.count(k) for k in range(num_scales)]
        if len(images) > 1:
            pieces[0] = (cols, images[1:])
        else:
            pieces.pop(0)
    if not src:
        return -1, before
    return seqs.add(src, tgt, -1, -1, b), before


def scaled_columns(
    valid: torch.Tensor,
    is_image: torch.Tensor,
    full: Sequence[int],
    counts: Sequence[int],
    *,
    left: bool,
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The columns of a padded batch that remain when image ``i``'s run of ``full[i]`` placeholders is cut to
    its first ``counts[i]`` (images in order): ``(index [B, W], attention_mask [B, W])`` with ``index`` -1 at
    padding, rows padded on the left or the right. None when the batch already holds ``counts`` placeholders.
    """
    have = int(is_image.sum())
    if have == sum(counts):
        return None
    runs = _row_runs(valid, is_image)
    if have != sum(full):
        raise ValueError(
            f"input_ids hold {have} image placeholder tokens: neither the {sum(full)} of the {len(full)} images at "
            f"full scale nor the {sum(counts)} of the scales asked for{_first_misfit(runs, full)}"
        )
    rows, image = [], 0
    for b, pieces in enumerate(runs):
        keep = []
        for cols, img in pieces:
            if not img:
                keep.append(cols)
                continue
            pos = 0
            for i in _split_run((b, int(cols[0]), cols.numel()), full, image, image_token_id):
                keep.append(cols[pos : pos + counts[i]])
                pos += full[i]
                image += 1
        rows.append(torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long))
    width = max((len(r) for r in rows), default=0)
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        index[b, width - len(r) if left else 0 :][: len(r)] = r
    return index, (index >= 0).long()
