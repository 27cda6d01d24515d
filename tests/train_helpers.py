"""A tiny run model (4x4 grid, scales 1/4/16) with the synthetic set's tokenizer, and LLaVA-format data files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaProcessor

from fastnest.hf.tiny import tiny_llava
from fastnest.train.model import save_run_model
from fastnest.train.tiny_processor import CLIPImageProcessor, synthetic_processor

TINY_SCALES = (1, 4, 16)
TINY_SIZE = 8  # pixels: 4x4 patches of 2


def tiny_processor() -> LlavaProcessor:
    size = TINY_SIZE
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=synthetic_processor().tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_model(processor: LlavaProcessor, seed: int = 0):
    torch.manual_seed(seed)
    tok = processor.tokenizer
    model = tiny_llava(
        grid=4,
        patch_size=2,
        vision_hidden=16,
        vision_layers=1,
        hidden=32,
        layers=2,
        heads=2,
        kv_heads=1,
        vocab=len(tok),
        image_token_id=tok.image_token_id,
    )
    model.config.vision_feature_layer = -1
    return model


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    processor = tiny_processor()
    save_run_model(tiny_model(processor, seed), processor, path, {"scales": list(TINY_SCALES), "system": "hi"})
    return path


def write_images(folder: Path, n: int, size: int = TINY_SIZE, seed: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def row(
    image: str | list[str] | None,
    question: str = "what colour is the background ?",
    answer: str = "red",
    qtype: str | None = None,
) -> dict:
    tag = "" if image is None else "<image>\n" * (len(image) if isinstance(image, list) else 1)
    out = {"conversations": [{"from": "human", "value": tag + question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        out["image"] = image
    if qtype is not None:
        out["question_type"] = qtype
    return out


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def tiny_config(output_dir, model_dir, **kw):
    """A short run of the tiny model on the synthetic set (no progress bar, no analysis unless asked)."""
    from fastnest.train.trainer import TrainConfig

    base = dict(
        output_dir=str(output_dir),
        model=str(model_dir),
        scales=TINY_SCALES,
        system="A chat",
        synthetic_turns=2,
        progress=False,
        analyze=False,
    )
    return TrainConfig(**(base | kw))


def cli_args(model_dir, output_dir, steps: int = 2, batch: int = 2, *extra: str) -> list[str]:
    """``fastnest train`` options of a short CPU run of the tiny model on the synthetic set."""
    return [
        "--model",
        str(model_dir),
        "--scales",
        ",".join(map(str, TINY_SCALES)),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--system",
        "A chat",
        "--synthetic-turns",
        "2",
        "--no-progress",
        "--no-analyze",
        "--device",
        "cpu",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def records(run_dir) -> list[dict]:
    """The run's ``metrics.jsonl`` records."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
