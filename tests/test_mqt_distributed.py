"""The released-mode draw of token counts is the same on every process (2 gloo processes), and differing
seeds are refused."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 30


def _worker(rank: int, init: str, out: str, seeds: tuple[int, int]) -> None:
    import fastnest
    from fastnest.hf import patch_state
    from fastnest.hf.tiny import tiny_mqt_llava

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # the processes' own RNGs differ: the draw must not depend on them
        model = tiny_mqt_llava(num_queries=16)
        try:
            fastnest.patch(model, num_tokens="released", seed=seeds[rank])
        except ValueError as e:
            result = {"error": str(e)}
        else:
            state = patch_state(model)
            result = {"draws": [state.training_spec().scales[0] for _ in range(STEPS)]}
        gathered = [None, None]
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def run(tmp_path, seeds):
    out = tmp_path / "out.json"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", str(out), seeds), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_released_draw_equal_across_two_gloo_processes(tmp_path):
    first, second = run(tmp_path, (11, 11))
    assert first["draws"] == second["draws"]
    assert len(set(first["draws"])) > 3


def test_differing_seeds_are_refused(tmp_path):
    first, second = run(tmp_path, (1, 2))
    for result in (first, second):
        assert "seed differs across processes (from 1 to 2" in result["error"]
