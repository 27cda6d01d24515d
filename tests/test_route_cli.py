"""``fastnest route`` end to end on a tiny model, the trade-off figures by hand, greedy confidence by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastnest
from fastnest.hf.route.tradeoff import (
    BUDGETS,
    cascade_point,
    fixed_points,
    frontier,
    gap_closed,
    oracle_point,
    router_point,
)
from fastnest.train.cli import main
from fastnest.train.data_llava import BadSamples, Collator, SyntheticExamples
from fastnest.train.route_data import ROUTE_HELDOUT_SEED, greedy_answers, prompts
from tests.train_helpers import TINY_SCALES, save_tiny_model, tiny_model, tiny_processor, write_images, write_json
from tools.m3_reference import scaled_rows

CORRECT = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
SCALES = (1, 4, 16)


def test_tradeoff_figures_by_hand():
    assert fixed_points(CORRECT, SCALES) == [(1, 0.25), (4, 0.5), (16, 0.75)]
    assert oracle_point(CORRECT, SCALES) == ((1 + 4 + 16 + 1) / 4, 0.75)  # unanswered: the smallest
    fixed = fixed_points(CORRECT, SCALES)
    assert frontier(fixed, 2) == pytest.approx(0.25 + 0.25 * 0.5)  # halfway from 1 to 4 in log tokens
    assert frontier([(1, 0.5), (4, 0.3), (16, 0.6)], 4) == 0.5  # the running best of fewer tokens
    assert frontier(fixed, 100) == 0.75 and frontier(fixed, 0.5) == 0.25
    assert gap_closed((2, 0.5), fixed, 0.75) == pytest.approx((0.5 - 0.375) / (0.75 - 0.375))
    assert gap_closed((16, 0.8), fixed, 0.75) is None
    conf = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [0.2, 0.2, 0.9], [0.1, 0.1, 0.1]])
    # stops at 1 / 1 -> 4 / 1 -> 4 -> 16 / 1 -> 4 -> 16 (the largest answers)
    assert cascade_point(conf, CORRECT, SCALES, 0.5) == ((1 + 5 + 21 + 21) / 4, 0.75)
    assert cascade_point(conf, CORRECT, SCALES, 0.0) == (1.0, 0.25)
    probs = torch.tensor([[0.9, 0.9, 0.9], [0.1, 0.9, 0.8], [0.1, 0.2, 0.9], [0.3, 0.2, 0.3]])
    tokens, accuracy, chosen = router_point(probs, CORRECT, SCALES, 1.0)
    assert chosen == [1, 4, 16, 1] and tokens == 1 + (1 + 4 + 16 + 1) / 4 and accuracy == 0.75


def test_greedy_confidence_by_hand():
    processor = tiny_processor()
    ref = tiny_model(processor, seed=2).eval()
    model = fastnest.patch_llava(copy.deepcopy(ref), scales=TINY_SCALES).eval()
    examples, bad = SyntheticExamples(3, seed=4, turns=1), BadSamples("fail")
    batch = Collator(processor, 16, 200, "A chat")([examples.example(i, bad) for i in range(3)], bad)
    prompt, answers = prompts(batch.inputs, pad_id=0)
    tok = processor.tokenizer
    confidence, correct = greedy_answers(model, prompt, answers, 4, 5, tok)
    embeds, labels, _ = scaled_rows(ref, **batch.inputs, scale=4)
    for b, (emb, lab) in enumerate(zip(embeds, labels)):
        x = emb[: int((lab != -100).nonzero()[0])]  # the prompt
        probs, new = [], []
        with torch.no_grad():
            for _ in range(5):  # a plain greedy loop, no cache
                p = torch.softmax(
                    ref.lm_head(ref.model.language_model(inputs_embeds=x[None]).last_hidden_state[0, -1]), -1
                )
                token = int(p.argmax())
                probs.append(float(p[token]))
                new.append(token)
                if token == tok.eos_token_id:
                    break
                x = torch.cat([x, ref.get_input_embeddings()(torch.tensor([token]))])
        assert confidence[b].item() == pytest.approx(min(probs), rel=1e-4)
        assert bool(correct[b]) == (new == answers[b].tolist())


def test_route_command_end_to_end(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "run" / "model")
    args = ["route", "--model", str(tmp_path / "run"), "--train-samples", "24", "--heldout-samples", "12"]
    args += ["--fit-steps", "50", "--folds", "2", "--cost-samples", "2", "--cost-repeats", "1", "--device", "cpu"]
    assert main(args) == 0
    out = tmp_path / "run" / "route"
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").is_file() and "## Targets" in (out / "report.md").read_text()
    info = json.loads((model_dir / "router" / "router.json").read_text())
    assert info["scales"] == list(TINY_SCALES) and info["fitting"]["samples"] == 24
    assert str(ROUTE_HELDOUT_SEED) in info["fitting"]["data"]
    cmp = report["comparison"]
    heldout = SyntheticExamples(12, seed=ROUTE_HELDOUT_SEED, turns=1)
    types = {heldout.example(i, BadSamples()).question_type for i in range(12)}
    assert set(cmp["by_type"]) == types and sum(g["n"] for g in cmp["by_type"].values()) == 12
    assert [p["scale"] for p in cmp["fixed"]] == list(TINY_SCALES)
    assert len(cmp["router_sweep"]) == len(BUDGETS) and len(cmp["cascade"]) > 5
    tokens = [p["tokens"] for p in cmp["router_sweep"]]
    assert tokens == sorted(tokens)  # budget monotone on held-out data
    assert cmp["greedy_agreement"] == 1.0  # generate and the teacher-forced score agree
    per = report["cost"]["per_answer"]
    assert per["fixed"]["visual_tokens"] == 16 and 1 < per["routed"]["visual_tokens"] <= 17
    assert "token ratio at the best fixed accuracy" in capsys.readouterr().out
    # the saved router serves scale="auto" on the reloaded model
    from fastnest.train.model import load_patched

    model, processor = load_patched(model_dir)
    examples, bad = SyntheticExamples(2, seed=1, turns=1), BadSamples("fail")
    batch = Collator(processor, 16, 200, "hi")([examples.example(i, bad) for i in range(2)], bad)
    prompt, _ = prompts(batch.inputs, pad_id=0)
    chosen = fastnest.route_scales(model.eval(), **prompt)
    gen = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**prompt, scale="auto", **gen), model.generate(**prompt, scale=chosen, **gen))


def test_route_refuses_rows_with_several_questions(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    names = write_images(tmp_path / "images", 4)
    two = {
        "image": names[0],
        "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the background ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many shapes are there ?"},
            {"from": "gpt", "value": "two"},
        ],
    }
    one = lambda i: {  # noqa: E731
        "image": names[i],
        "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}],
    }
    data = write_json(tmp_path / "data.json", [two, one(1), one(2), one(3)])
    args = ["route", "--model", str(model_dir), "--data", str(data), "--image-folder", str(tmp_path / "images")]
    assert main([*args, "--cost-samples", "0", "--folds", "2", "--device", "cpu", "--heldout-fraction", "0.5"]) == 2
    assert "several answers; fastnest route scores one question per row" in capsys.readouterr().err
