"""Training/evaluation examples: LLaVA conversation-format JSON, or the built-in synthetic set; bad-row policy.

A LLaVA row is ``{"image": "a.jpg" | ["a.jpg", ...] (optional), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Rows are checked when the file is read (structure,
``<image>`` tags against images, image files present) and again when used (image decodes, length fits).
A bad row is reported with its file and row, then skipped or fatal per the ``on_bad`` policy.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..packing import IGNORE_INDEX
from .data_synthetic import SyntheticVQA
from .images import pixel_values, rgb_array
from .template import IMAGE_TAG, SYSTEM_V1, BadSample, check_conversation, count_image_tags, encode_v1

log = logging.getLogger("fastnest.train")
POLICIES = ("skip", "fail")
BAD_KINDS = (
    "malformed JSON",
    "malformed row",
    "image count mismatch",
    "missing image",
    "corrupt image",
    "over-long row",
    "not UTF-8",
    "no assistant turn",
    "image tag in an assistant turn",
)


class BadSampleError(RuntimeError):
    """A bad row under ``--on-bad-sample fail``."""


@dataclass
class BadSamples:
    """Applies the bad-row policy and counts what was skipped, by reason."""

    policy: str = "fail"
    quiet: bool = False  # count without logging (a process other than the first reading the same file)
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {self.policy!r}")

    def report(self, where: str, kind: str, why: str) -> None:
        assert kind in BAD_KINDS, kind
        message = f"bad sample: {where}: {why}"
        if self.policy == "fail":
            raise BadSampleError(f"{message} (use --on-bad-sample skip to skip such rows)")
        if not self.quiet:
            log.warning("%s (skipped)", message)
        self.counts[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "bad samples: 0"
        return f"bad samples: {self.total} skipped ({', '.join(f'{k}: {n}' for k, n in sorted(self.counts.items()))})"


@dataclass(frozen=True)
class Example:
    conversations: list[dict]
    images: list  # uint8 RGB arrays [H, W, 3] (or PIL images: see images.rgb_array)
    where: str  # "file row N", for messages
    question_type: str = "all"


class SyntheticExamples:
    """The built-in dataset as ``Example`` rows."""

    def __init__(self, size: int, seed: int, turns: int = 1, curriculum: bool = False) -> None:
        self.data = SyntheticVQA(size, seed=seed, turns=turns, curriculum=curriculum)

    def __len__(self) -> int:
        return len(self.data)

    def example(self, index: int, bad: BadSamples) -> Example:
        s = self.data[index]
        return Example(s.conversation(), [s.image], f"synthetic(seed={self.data.seed}) row {index}", s.question_type)


def _read_rows(file: Path, bad: BadSamples) -> list[tuple[int, object]]:
    """(row number, parsed row) pairs of a JSON array or a JSON-lines file."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e.strerror})") from e
    if file.suffix == ".jsonl":
        return _read_lines(file, data, bad)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # a JSON array cannot be split into rows without decoding it: always fatal
        raise BadSampleError(f"{file}: not UTF-8 at byte {e.start} ({e.reason}); data files must be UTF-8") from e
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:  # a broken array cannot be split into rows: always fatal
        raise BadSampleError(f"{file}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(rows, list):
        raise BadSampleError(f"{file}: expected a JSON array of rows, got {type(rows).__name__}")
    return list(enumerate(rows))


def _read_lines(file: Path, data: bytes, bad: BadSamples) -> list[tuple[int, object]]:
    """JSON lines: a line that is not UTF-8 or not JSON is one bad row."""
    rows, offset = [], 0
    for i, raw in enumerate(data.split(b"\n")):
        start, offset = offset, offset + len(raw) + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.report(f"{file} row {i}", "not UTF-8", f"not UTF-8 at byte {start + e.start} of the file ({e.reason})")
            continue
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            bad.report(f"{file} row {i}", "malformed JSON", f"malformed JSON ({e.msg}, column {e.colno})")
    return rows


class LlavaJsonExamples:
    """Rows of a LLaVA conversation-format file, with images under ``image_folder``."""

    def __init__(
        self, file: str | Path, image_folder: str | Path | None, bad: BadSamples, flag: str = "--data"
    ) -> None:
        self.file = Path(file)
        if not self.file.is_file():
            raise ValueError(f"{flag} {self.file}: no such file")
        self.folder = Path(image_folder) if image_folder is not None else self.file.parent
        self.rows: list[tuple[int, dict, list[Path]]] = []
        for i, row in _read_rows(self.file, bad):
            where = f"{self.file} row {i}"
            try:
                self.rows.append((i, row, self._check(row)))
            except BadSample as e:
                bad.report(where, e.kind, str(e))

    def _check(self, row: object) -> list[Path]:
        if not isinstance(row, dict):
            raise BadSample(f"a row must be a JSON object, got {type(row).__name__}", "malformed row")
        conversations = check_conversation(row.get("conversations"))
        images = row.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise BadSample(f'"image" must be a path or a list of paths, got {images!r:.80}', "malformed row")
        tags = count_image_tags(conversations)
        if tags != len(images):
            raise BadSample(f"{tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)", "image count mismatch")
        paths = [self.folder / p for p in images]
        for p in paths:
            if not p.is_file():
                raise BadSample(f"image {p} not found", "missing image")
        return paths

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, bad: BadSamples) -> Example | None:
        from PIL import Image

        i, row, paths = self.rows[index]
        where = f"{self.file} row {i}"
        images = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    images.append(rgb_array(im, str(p)))
            except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image I can decode"
                bad.report(where, "corrupt image", f"image {p} cannot be decoded ({e})")
                return None
        qtype = str(row.get("question_type", row.get("category", "all")))
        return Example(row["conversations"], images, where, qtype)


@dataclass
class Batch:
    inputs: dict  # input_ids, attention_mask, labels, pixel_values (when any image)
    question_types: list[str]
    where: list[str]

    @property
    def size(self) -> int:
        return len(self.where)


class Collator:
    """Examples -> a right-padded batch in ``LlavaProcessor``'s layout, labels on assistant turns.

    An anyres processor (``LlavaNextProcessor``: its image processor has ``image_grid_pinpoints``) gives each
    image its own placeholder count, the processor's for the image's size, and the batch carries
    ``pixel_values [images, crops, 3, H, W]`` and ``image_sizes``; ``tokens_per_image`` is then unused."""

    def __init__(self, processor, tokens_per_image: int, max_length: int, system: str = SYSTEM_V1) -> None:
        self.processor, self.tokenizer, self.images = processor, processor.tokenizer, processor.image_processor
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TAG))
        self.tokens_per_image, self.max_length, self.system = tokens_per_image, max_length, system
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.anyres = getattr(self.images, "image_grid_pinpoints", None) is not None

    def image_counts(self, images: list) -> int | list[int]:
        """Placeholders per image: the fixed count, or (anyres) the processor's count for each image's size."""
        if not self.anyres:
            return self.tokens_per_image
        sizes = [rgb_array(im).shape[:2] for im in images]
        return self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens

    def __call__(self, examples: list[Example | None], bad: BadSamples) -> Batch | None:
        kept, encoded = [], []
        for ex in examples:
            if ex is None:
                continue
            counts = self.image_counts(ex.images)
            try:
                enc = encode_v1(
                    ex.conversations,
                    self.tokenizer,
                    image_token_id=self.image_token_id,
                    tokens_per_image=counts,
                    system=self.system,
                )
            except BadSample as e:
                bad.report(ex.where, e.kind, str(e))
                continue
            if len(enc.input_ids) > self.max_length:
                bad.report(
                    ex.where,
                    "over-long row",
                    f"{len(enc.input_ids)} tokens ({enc.num_images} image(s) of {counts}) exceed "
                    f"--max-length {self.max_length}",
                )
                continue
            kept.append(ex)
            encoded.append(enc)
        if not kept:
            return None
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(kept), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(kept), width), dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[b, :n], labels[b, :n], mask[b, :n] = e.input_ids, e.labels, 1
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [im for ex in kept for im in ex.images]
        if images:
            inputs.update(pixel_values(self.images, images))
        return Batch(inputs, [ex.question_type for ex in kept], [ex.where for ex in kept])


def count_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Next-token targets per scale in a batch: labelled positions except each row's first real token."""
    first = attention_mask.long().argmax(dim=1)
    labelled = (labels != IGNORE_INDEX) & attention_mask.bool()
    labelled[torch.arange(labels.shape[0]), first] = False
    return int(labelled.sum())


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
