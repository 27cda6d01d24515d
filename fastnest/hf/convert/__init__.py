"""``convert_original``: an original-format LLaVA checkpoint (M3 LLaVA-1.5, M3 LLaVA-NeXT anyres, MQT-LLaVA) as
a Hugging Face directory that ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` /
``MQTLlavaForConditionalGeneration`` load with no missing or unexpected keys, with its processor and the
Matryoshka settings in ``config.fastnest`` (``fastnest.patch`` reads them).

Every name, shape and missing weight is checked against the target model (built on the meta device) before a
byte is written; then one source file at a time is read, renamed and written as one shard, so the conversion
holds at most one shard's tensors. Tensors keep their bytes and dtype; only the vocabulary matrices gain the
image and pad tokens' rows (the mean of the existing rows), and a tower read from a separate CLIP directory
is cast to the checkpoint's dtype (as the release's loader casts it).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from ..mqt_model import MQTLlavaForConditionalGeneration
from . import io
from .config import Original, hf_config, read_original, text_config, vision_config
from .keys import ORIGINAL_TOWER, VOCABULARY, checkpoint_name, tower_name, tower_prefix
from .tokenizer import IMAGE_TOKEN, converted_processor, converted_tokenizer, vocabulary_rows

logger = logging.getLogger(__name__)

MODELS = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "mqt_llava": MQTLlavaForConditionalGeneration,
}
SHOWN = 8  # names listed in an error


def convert_original(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None) -> Path:
    """Convert the original-format checkpoint directory ``src`` into the new Hugging Face directory ``dst``.

    ``vision_tower``: a CLIP directory (e.g. a download of ``openai/clip-vit-large-patch14-336``) for the
    tower's config and preprocessing, and its weights when ``src`` holds none; default: ``mm_vision_tower``
    when it is a local directory. Tower weights saved in ``src`` win over the directory's. Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} exists and is not an empty directory; name a new one")
    original = read_original(src)
    tower_dir = _tower_dir(original, vision_tower)
    vision = vision_config(tower_dir)
    sources = [(path, _shapes(path)) for path in io.weight_files(src)]
    shapes = _merged(sources)
    tower_in_checkpoint = any(name.startswith(ORIGINAL_TOWER) for name in shapes)
    tower_sources = [] if tower_in_checkpoint else [(p, _shapes(p)) for p in _tower_files(src, tower_dir)]
    tokenizer = converted_tokenizer(src, text_config(original))
    embedding = shapes.get("model.embed_tokens.weight")
    if embedding is None:
        raise ValueError(f"{src}: missing weights: model.embed_tokens.weight (the language model's embedding)")
    rows = vocabulary_rows(tokenizer, embedding[0])
    num_queries = _num_queries(original, shapes, src)
    config = hf_config(
        original,
        vision,
        vocab_size=rows,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        num_queries=num_queries,
    )
    with torch.device("meta"):
        target = {name: tuple(t.shape) for name, t in MODELS[original.kind](config).state_dict().items()}
    prefix = tower_prefix(target)
    newline = original.kind == "llava_next"
    plans = [(p, {n: checkpoint_name(n, prefix, newline) for n in s}) for p, s in sources]
    plans += [(p, {n: tower_name(n, prefix) for n in s}) for p, s in tower_sources]
    _check(plans, {**shapes, **_merged(tower_sources)}, target, tower_in_checkpoint, tower_dir)
    dropped = sum(t is None for _, plan in plans for t in plan.values())
    logger.info(
        "%s -> %s (%s); %d tensors not carried over (recomputed buffers, CLIP's text half)",
        src,
        dst,
        original.kind,
        dropped,
    )
    plans = [(p, {n: t for n, t in plan.items() if t is not None}) for p, plan in plans]
    plans = [(p, plan) for p, plan in plans if plan]
    partial = dst.with_name(dst.name + ".partial")  # renamed to dst when complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write(plans, partial, rows, {p for p, _ in tower_sources}, original.dtype)
        config.save_pretrained(partial)
        converted_processor(original, tokenizer, tower_dir, vision.patch_size, num_queries).save_pretrained(partial)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", partial / "generation_config.json")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()
    partial.rename(dst)
    return dst


def _write(plans, directory: Path, rows: int, towers: set[Path], dtype: torch.dtype | None) -> None:
    """Each source file's tensors, renamed, as one shard: only one file's tensors are held at a time."""
    writer = io.ShardWriter(directory, len(plans))
    for path, plan in plans:
        logger.info("converting %s (%d tensors)", path, len(plan))
        with io.opened(path) as handles:
            tensors = {}
            for name, new in plan.items():
                tensor = io.load(handles[name])
                if new in VOCABULARY:
                    tensor = _grown(tensor, rows)
                elif path in towers and dtype is not None:  # as the release's loader casts its tower
                    tensor = tensor.to(dtype)
                tensors[new] = tensor
            writer.write(tensors)
            del tensors
    writer.finish()


def _tower_dir(original: Original, vision_tower: str | Path | None) -> Path:
    if vision_tower is not None:
        if not Path(vision_tower).is_dir():
            raise ValueError(f"--vision-tower {vision_tower}: not a directory")
        return Path(vision_tower)
    if Path(original.vision_tower).is_dir():
        return Path(original.vision_tower)
    raise ValueError(
        f"the vision tower's config and preprocessing: mm_vision_tower {original.vision_tower!r} is not a local "
        f"directory; download it (huggingface-cli download {original.vision_tower} --local-dir DIR) and pass "
        "--vision-tower DIR"
    )


def _tower_files(src: Path, tower_dir: Path) -> list[Path]:
    try:
        return io.weight_files(tower_dir)
    except ValueError:
        raise ValueError(
            f"{src} holds no vision tower weights ({ORIGINAL_TOWER}*) and {tower_dir} none either: pass "
            "--vision-tower DIR, a CLIP directory with its weights"
        ) from None


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with io.opened(path) as handles:
        return {name: io.shape(h) for name, h in handles.items()}


def _merged(sources: list[tuple[Path, dict]]) -> dict[str, tuple[int, ...]]:
    merged: dict[str, tuple[int, ...]] = {}
    for path, shapes in sources:
        twice = sorted(set(shapes) & set(merged))
        if twice:
            raise ValueError(f"{path}: tensors also in an earlier shard: {twice[:SHOWN]}")
        merged.update(shapes)
    return merged


def _num_queries(original: Original, shapes: dict, src: Path) -> int | None:
    if original.kind != "mqt_llava":
        return None
    query = shapes.get("model.query_abstractor.query")
    if query is None:
        raise ValueError(f"{src}: missing weights: model.query_abstractor.query (the MQT connector's queries)")
    return query[0]


def _check(plans, shapes: dict, target: dict, tower_in_checkpoint: bool, tower_dir: Path) -> None:
    """ValueError naming unexpected, duplicated, missing or misshapen tensors, before anything is written."""
    produced: dict[str, str] = {}
    unexpected, twice, misshapen = [], [], []
    for _, plan in plans:
        for name, new in plan.items():
            if new is None:
                continue
            if new not in target:
                unexpected.append(name)
            elif new in produced:
                twice.append(f"{name} and {produced[new]} (both {new})")
            elif not _fits(shapes[name], target[new], new in VOCABULARY):
                misshapen.append(f"{name} {list(shapes[name])} (expected {list(target[new])})")
            produced.setdefault(new, name)
    if unexpected:
        raise ValueError(
            f"unexpected weights (no place in the Hugging Face model): {unexpected[:SHOWN]}"
            + (f" and {len(unexpected) - SHOWN} more" if len(unexpected) > SHOWN else "")
        )
    if twice:
        raise ValueError(f"weights given twice: {twice[:SHOWN]}")
    if misshapen:
        raise ValueError(f"weights of the wrong shape: {misshapen[:SHOWN]}")
    missing = sorted(set(target) - set(produced))
    if missing:
        where = "the checkpoint" if tower_in_checkpoint else f"the checkpoint and {tower_dir}"
        raise ValueError(
            f"missing weights (not in {where}): {missing[:SHOWN]}"
            + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
        )


def _fits(shape: tuple[int, ...], expected: tuple[int, ...], vocabulary: bool) -> bool:
    """Equal shapes; a vocabulary matrix may have fewer rows (the conversion appends them)."""
    if vocabulary:
        return len(shape) == len(expected) == 2 and shape[1] == expected[1] and shape[0] <= expected[0]
    return shape == expected


def _grown(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` with rows appended up to ``rows``, each the mean of its rows (summed in fp32). Hugging Face's
    conversion draws them from a normal around that mean with 1e-5 of the rows' covariance: the mean itself
    is that distribution's centre, deterministic, and needs no second copy of the matrix."""
    extra = rows - matrix.shape[0]
    if extra == 0:
        return matrix
    mean = (matrix.sum(dim=0, dtype=torch.float32) / matrix.shape[0]).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(extra, -1)])
