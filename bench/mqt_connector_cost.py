"""Is a fused MQT connector kernel worth it? Its FLOPs and bytes at LLaVA-1.5-7B shapes beside one LM layer's.

Run: ``python -m bench.mqt_connector_cost [--images N] [--text T] [--time]``. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` over the real modules on the meta device (fastnest's
``MatryoshkaQueryTransformer(1024, 4096)``: 576 x 1024 bf16 features per image, M = 256 queries, 16 heads;
one ``LlamaDecoderLayer`` of Llama-2-7B: width 4096, MLP 11008, 32 heads, over the sequence an MQT image
makes: M image tokens + T text tokens per image). Bytes are the weights plus the activations each op reads
and writes once (bf16), i.e. the floor a perfectly fused kernel would still move. ``--time`` also times both
forwards on this machine's CPU in fp32 (a rough check of the ratio, not a GPU figure).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from fastnest import MatryoshkaQueryTransformer

DV, D, GRID, M, HEADS = 1024, 4096, 24, 256, 16
LLAMA = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
BYTES = 2  # bf16


def connector_bytes(images: int) -> int:
    """Weights + every activation written and read once: features, LN(v), K, V (positional keys: once),
    queries, the scores of each head, the mixed values, the out_proj output and the result."""
    weights = (2 * M * DV) + (4 * DV * DV + 4 * DV) + 6 * DV + DV * D
    per_image = GRID * GRID * DV * 3 + M * DV * 2 + HEADS * M * GRID * GRID + M * D
    shared = GRID * GRID * DV + M * DV  # positional keys and the queries do not depend on the image
    return BYTES * (weights + shared + images * per_image)


def layer_bytes(tokens: int) -> int:
    """Weights + the activations of one decoder layer (no attention matrix: flash-style attention)."""
    h, f = LLAMA["hidden_size"], LLAMA["intermediate_size"]
    weights = 4 * h * h + 3 * h * f + 2 * h
    acts = tokens * (h * 2 + 3 * h + h + h + 2 * f + f + h)
    return BYTES * (weights + acts)


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(device: str, dtype: torch.dtype, images: int, tokens: int):
    with torch.device(device):
        connector = MatryoshkaQueryTransformer(DV, D, num_queries=M, num_heads=HEADS, grid=GRID).to(dtype)
        config = LlamaConfig(**LLAMA, num_hidden_layers=1)
        config._attn_implementation = "sdpa"
        layer = LlamaDecoderLayer(config, 0).to(dtype)
        feats = torch.randn(images, GRID * GRID, DV, dtype=dtype)
        hidden = torch.randn(1, tokens, LLAMA["hidden_size"], dtype=dtype)
        pos = torch.arange(tokens)[None]
        rope = LlamaRotaryEmbedding(config)(hidden, pos)
    run_connector = lambda: connector(feats)  # noqa: E731
    run_layer = lambda: layer(hidden, position_embeddings=rope, position_ids=pos, attention_mask=None)  # noqa: E731
    return run_connector, run_layer


def timed(fn, rounds: int = 3) -> float:
    with torch.no_grad():
        fn()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--text", type=int, default=100, help="text tokens per image in the LM sequence")
    parser.add_argument("--time", action="store_true")
    args = parser.parse_args()
    tokens = args.images * (M + args.text)
    run_connector, run_layer = build("meta", torch.bfloat16, args.images, tokens)
    c_flops, l_flops = count(run_connector), count(run_layer)
    c_bytes, l_bytes = connector_bytes(args.images), layer_bytes(tokens)
    print(f"shapes: {args.images} image(s) of {GRID * GRID} x {DV} features, M={M}, LM sequence {tokens} tokens, bf16")
    print(f"{'':18}{'GFLOP':>10}{'MB moved':>10}{'FLOP/byte':>11}")
    for name, flops, moved in (("connector", c_flops, c_bytes), ("one LM layer", l_flops, l_bytes)):
        print(f"{name:18}{flops / 1e9:10.2f}{moved / 1e6:10.1f}{flops / moved:11.0f}")
    print(f"connector / one layer: {c_flops / l_flops:.1%} of the FLOPs, {c_bytes / l_bytes:.1%} of the bytes")
    print(f"connector / 32 layers (7B): {c_flops / (32 * l_flops):.2%} of the FLOPs")
    if args.time:
        run_connector, run_layer = build("cpu", torch.float32, args.images, tokens)
        tc, tl = timed(run_connector), timed(run_layer)
        print(f"CPU fp32 forward: connector {tc * 1e3:.1f} ms, one layer {tl * 1e3:.1f} ms ({tc / tl:.1%})")


if __name__ == "__main__":
    main()
