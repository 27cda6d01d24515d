"""Peak memory and time of ``fastnest convert`` on a generated original-format checkpoint.

``python -m tools.convert_memory DIR [--hidden 2048 --layers 16 --shards 5 ...]`` writes a random bf16 M3
LLaVA-1.5 checkpoint (a Llama of the given size, a CLIP ViT-L/14-336-shaped tower inside, a tokenizer filling
the vocabulary) into DIR/original a shard at a time, converts it in a fresh process into DIR/hf, prints the
sizes, the converting process's peak resident memory above its resident memory before the conversion (after
its imports; the kernel's high-water mark is reset there through /proc/self/clear_refs) and the time, then
deletes DIR's two checkpoints (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tools.original_llava import (
    OriginalLlava,
    original_config,
    tiny_configs,
    word_tokenizer,
    write_clip_config,
    write_shards,
)

CLIP_L_336 = {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096}
CLIP_L_LAYERS, CLIP_L_HEADS = 24, 16

# runs in the measured process: nothing but the imports is resident before the high-water mark is reset
MEASURE = textwrap.dedent(
    """
    import json, sys, time
    from fastnest.hf.convert import convert_original

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = status("VmRSS:")
    start = time.perf_counter()
    convert_original(sys.argv[1], sys.argv[2])
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before_mib": before, "peak_rss_mib": status("VmHWM:"), "seconds": seconds}))
    """
)


def generate(
    directory: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    shards: int,
    tower: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, int]:
    """An original-format checkpoint of random ``dtype`` weights in ``shards`` files of about equal bytes (the
    tower a small CLIP unless ``tower`` gives CLIP options), written a shard at a time; its CLIP config beside
    it (``directory/clip``). Returns the bytes of each shard."""
    text, vision = tiny_configs(vocab=vocab)
    for key, value in {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}.items():
        setattr(text, key, value)
    text.num_attention_heads = text.num_key_value_heads = heads
    text.head_dim = hidden // heads
    if tower:
        for key, value in tower.items():
            setattr(vision, key, value)
    with torch.device("meta"):
        model = OriginalLlava(text, vision, "llava")
    shapes = {k: tuple(v.shape) for k, v in model.original_state_dict().items()}
    sizes = {k: math.prod(s) * dtype.itemsize for k, s in shapes.items()}
    budget = sum(sizes.values()) / shards
    parts: list[list[str]] = [[]]
    for name in shapes:  # consecutive names, a new shard once this one holds its share
        if sum(sizes[n] for n in parts[-1]) >= budget and len(parts) < shards:
            parts.append([])
        parts[-1].append(name)
    generator = torch.Generator().manual_seed(seed)
    original = directory / "original"
    write_shards(original, parts, lambda name: (0.02 * torch.randn(shapes[name], generator=generator)).to(dtype))
    clip = write_clip_config(vision, directory / "clip")
    config = original_config(model, str(clip), torch_dtype=str(dtype).removeprefix("torch."))
    (original / "config.json").write_text(json.dumps(config, indent=2))
    word_tokenizer(vocab).save_pretrained(original)
    return {f"shard {i + 1}": sum(sizes[n] for n in part) for i, part in enumerate(parts)}


def measure(src: Path, dst: Path) -> dict[str, float]:
    """Convert ``src`` into ``dst`` in a fresh process: its resident memory before, its peak, and the time."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(dst)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    args = parser.parse_args()
    tower = {**CLIP_L_336, "num_hidden_layers": CLIP_L_LAYERS, "num_attention_heads": CLIP_L_HEADS}
    options = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "shards")}
    try:
        shard_bytes = generate(args.directory, tower=tower, **options)
        result = measure(args.directory / "original", args.directory / "hf")
    finally:
        if not args.keep:
            for name in ("original", "hf", "clip"):
                shutil.rmtree(args.directory / name, ignore_errors=True)
    mib = 2**20
    total, largest = sum(shard_bytes.values()) / mib, max(shard_bytes.values()) / mib
    peak, before = result["peak_rss_mib"], result["rss_before_mib"]
    print(f"checkpoint: {total:.0f} MiB bf16 in {len(shard_bytes)} shards (largest {largest:.0f} MiB)")
    print(f"resident before the conversion: {before:.0f} MiB; peak: {peak:.0f} MiB (+{peak - before:.0f} MiB)")
    print(f"time: {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
