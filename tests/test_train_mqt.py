"""``fastnest train --connector mqt`` and ``fastnest analyze`` of an MQT-LLaVA, through the CLI, against plain
re-statements: the released objective one m at a time (tools/mqt_reference.py: the connector at m queries, full
LM, full fp32 logits), the seeded draw, teacher-forced greedy correctness per m and the oracle written out."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import fastnest
from fastnest.hf import MQTLlavaForConditionalGeneration, processor_for_queries
from fastnest.hf.tiny import tiny_mqt_llava
from fastnest.scales import QueryCounts
from fastnest.train.analyze import score_batch
from fastnest.train.cli import main
from fastnest.train.data_llava import BadSamples, Batch, Collator, Example, SyntheticExamples
from fastnest.train.model import save_run_model
from fastnest.train.run_analysis import SYNTHETIC_EVAL_SEED
from tests.train_helpers import records, save_tiny_model, tiny_processor
from tools.m3_reference import reference_greedy
from tools.mqt_reference import count_rows, released_mqt_loss

M = 16  # the tiny model's queries (a 4x4 query grid over a 4x4 feature grid)
RELEASED = tuple(range(2, M + 1, 2))  # the release's choices: random.choice(range(2, M + 2, 2))
SEED = 3


def save_tiny_mqt(path):
    processor = processor_for_queries(tiny_processor(), M)
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = tiny_mqt_llava(
        num_queries=M,
        query_heads=2,
        grid=4,
        patch_size=2,
        vision_hidden=16,
        vision_layers=2,  # features: hidden state -2, as the reference reads them
        hidden=32,
        vocab=len(tok),
        image_token_id=tok.image_token_id,
    )
    save_run_model(model, processor, path, {})
    return path


@pytest.fixture(scope="module")
def mqt_dir(tmp_path_factory):
    return save_tiny_mqt(tmp_path_factory.mktemp("mqt") / "model")


def args(model_dir, out, *extra, steps=1, batch=3):
    return [
        "train",
        "--connector",
        "mqt",
        "--model",
        str(model_dir),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--system",
        "A chat",
        "--synthetic-turns",
        "2",
        "--seed",
        str(SEED),
        "--no-progress",
        "--no-analyze",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]


def recording_batches(monkeypatch) -> list:
    """The collated micro-batches of a run, in order."""
    batches, collate = [], Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, *a: batches.append(collate(self, *a)) or batches[-1])
    return batches


def draws(k: int, n: int) -> list[tuple[int, ...]]:
    """The seeded draw restated: per forward, k distinct counts of 2, 4, ..., M, sorted."""
    rng = random.Random(SEED)
    return [tuple(sorted(rng.sample(RELEASED, k))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mqt_dir):
    """24 released-mode steps (checkpoints at 20 and 24) and the micro-batch of step 1."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        batches = recording_batches(mp)
        extra = ("--num-tokens", "released", "--lr", "1e-2", "--warmup-steps", "5", "--save-every", "20")
        assert main(args(mqt_dir, run, *extra, "--save-total-limit", "0", steps=24, batch=4)) == 0
    return run, batches[0]


def reference_losses(model_dir, batch, counts):
    ref = MQTLlavaForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        return released_mqt_loss(ref, **batch.inputs, counts=counts)


def assert_step_matches(record, model_dir, batch, counts):
    assert [int(s) for s in record["scale_losses"]] == list(counts)  # the counts this step trained
    loss, per_count = reference_losses(model_dir, batch, counts)
    assert record["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert list(record["scale_losses"].values()) == pytest.approx(per_count.tolist(), rel=1e-5)


def test_released_step_one_equals_the_reference_at_the_drawn_count(trained, mqt_dir):
    run, batch = trained
    logged = records(run)
    assert_step_matches(logged[0], mqt_dir, batch, draws(1, 1)[0])  # the draw is seeded from --seed
    assert [tuple(map(int, r["scale_losses"])) for r in logged] == draws(1, 24)
    assert logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.parametrize("num_tokens, counts", [("2,8", (2, 8)), ("random:3", draws(3, 1)[0])])
def test_listed_and_random_k_counts_at_step_one_equal_the_reference(tmp_path, mqt_dir, monkeypatch, num_tokens, counts):
    batches = recording_batches(monkeypatch)
    assert main(args(mqt_dir, tmp_path / "run", "--num-tokens", num_tokens)) == 0
    assert_step_matches(records(tmp_path / "run")[0], mqt_dir, batches[0], counts)


def test_accumulated_micro_batches_log_each_drawn_count_over_its_own_tokens(tmp_path, mqt_dir, monkeypatch):
    """Under "released" each forward draws its own m: with 2 micro-batches a step trains two counts; each is
    logged as its micro-batch's token-mean loss, the step's loss is the token-weighted mean of both."""
    batches = recording_batches(monkeypatch)
    assert main(args(mqt_dir, tmp_path / "run", "--num-tokens", "released", "--grad-accum", "2", batch=2)) == 0
    (first,), (second,) = draws(1, 2)
    assert first != second  # the seed is chosen so; else this test shows nothing
    (record,) = records(tmp_path / "run")
    assert [int(s) for s in record["scale_losses"]] == [first, second]
    means, items = [], []
    for batch, m in zip(batches, (first, second)):
        means.append(float(reference_losses(mqt_dir, batch, (m,))[0]))
        items.append(int((batch.inputs["labels"][:, 1:] != -100).sum()))
    assert list(record["scale_losses"].values()) == pytest.approx(means, rel=1e-5)
    weighted = (means[0] * items[0] + means[1] * items[1]) / sum(items)
    assert record["loss"] == pytest.approx(weighted, rel=1e-5)


def test_resume_continues_the_released_draw_exactly(tmp_path, trained, mqt_dir):
    run, _ = trained
    straight = records(run)
    # A draw restarted from --seed would give steps 21-24 the counts of steps 1-4: those differ here.
    assert [r["scale_losses"].keys() for r in straight[20:]] != [r["scale_losses"].keys() for r in straight[:4]]
    resumed = tmp_path / "resumed"
    step = "step-00000020"
    shutil.copytree(run / "checkpoints" / step, resumed / "checkpoints" / step)
    extra = ("--num-tokens", "released", "--lr", "1e-2", "--warmup-steps", "5", "--save-every", "20")
    assert main([*args(mqt_dir, tmp_path / "unused", *extra, steps=24, batch=4), "--resume", str(resumed)]) == 0
    again = records(resumed)
    assert [r["step"] for r in again] == [21, 22, 23, 24]
    assert [(r["loss"], r["scale_losses"]) for r in again] == [(r["loss"], r["scale_losses"]) for r in straight[20:]]
    final_a = MQTLlavaForConditionalGeneration.from_pretrained(run / "model").state_dict()
    final_b = MQTLlavaForConditionalGeneration.from_pretrained(resumed / "model").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_without_the_draw_state_is_refused(tmp_path, trained, mqt_dir, capsys):
    run, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step-00000020", resumed / "checkpoints" / "step-00000020")
    rng_file = resumed / "checkpoints" / "step-00000020" / "rng-rank0.pt"
    state = torch.load(rng_file, weights_only=False)
    del state["count_draw"]
    torch.save(state, rng_file)
    extra = ("--num-tokens", "released", "--lr", "1e-2", "--warmup-steps", "5", "--save-every", "20")
    assert main([*args(mqt_dir, tmp_path / "unused", *extra, steps=24, batch=4), "--resume", str(resumed)]) == 2
    assert "holds no state of the per-step token-count draw" in capsys.readouterr().err


@torch.no_grad()
def reference_correct(model, batch, m: int) -> list[bool]:
    """Per row: at count m, the full model's argmax (fed the reference) is every labelled token."""
    embeds, labels = spliced(model, batch, m)
    out = []
    for e, lab in zip(embeds, labels):
        hidden = model.model.language_model(inputs_embeds=e[None], use_cache=False).last_hidden_state[0]
        predicted = model.lm_head(hidden).argmax(-1)[:-1]
        where = lab[1:] != -100
        out.append(bool((predicted[where] == lab[1:][where]).all()))
    return out


def spliced(model, batch, m: int):
    i = batch.inputs
    return count_rows(model, i["input_ids"], i["attention_mask"], i.get("pixel_values"), i["labels"], m)


def greedy_answer(model, collate, example, m: int, eos: int) -> list[int]:
    """The reference's greedy answer at count m (the tokens before its end-of-sequence token)."""
    (embeds,), (labels,) = spliced(model, collate([example], BadSamples("fail")), m)
    start = int((labels != -100).nonzero()[0])  # the first answer token: the prompt ends before it
    tokens = reference_greedy(model, embeds[:start].detach(), 4)
    assert eos in tokens, f"greedy at m={m} did not end its answer within 4 tokens: {tokens}"
    return tokens[: tokens.index(eos)]


def test_analysis_per_count_equals_reference_greedy_correctness_and_the_oracle(trained, tmp_path):
    """``fastnest analyze --data`` on the trained model, against correctness computed with the plain reference
    per m. The data makes it telling: half of the rows answer with the reference's greedy answer at some m
    (right at that m at least), half with a word that greedy gives at no m (wrong at every m)."""
    from PIL import Image

    run, _ = trained
    counts = (2, 4, 8, M)  # the log-spaced default for M = 16
    model = MQTLlavaForConditionalGeneration.from_pretrained(run / "model").eval()
    processor = AutoProcessor.from_pretrained(run / "model")
    tok = processor.tokenizer
    collate = Collator(processor, M, 2048, "A chat")
    synthetic = SyntheticExamples(8, seed=SYNTHETIC_EVAL_SEED, turns=1)
    rows, examples = [], []
    for i in range(8):
        ex = synthetic.example(i, BadSamples("fail"))
        Image.fromarray(ex.images[0]).save(tmp_path / f"{i}.png")
        answers = {m: greedy_answer(model, collate, ex, m, tok.eos_token_id) for m in counts}
        if i % 2 == 0:
            answer = tok.convert_ids_to_tokens(answers[counts[i // 2 % len(counts)]])
        else:
            firsts = {a[0] for a in answers.values() if a}
            answer = [next(w for w in ("cyan", "magenta", "yellow") if tok.convert_tokens_to_ids(w) not in firsts)]
        conversation = [ex.conversations[0], {"from": "gpt", "value": " ".join(answer)}]
        rows.append({"image": f"{i}.png", "conversations": conversation, "question_type": ex.question_type})
        examples.append(Example(conversation, ex.images, f"row {i}", ex.question_type))
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(run), "--data", str(tmp_path / "eval.json"), "--batch-size", "4",
                 "--device", "cpu", "--output-dir", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["scales"] == list(counts) and report["prefill_passes"] == 2

    batch = collate(examples, BadSamples("fail"))
    correct = list(zip(*(reference_correct(model, batch, m) for m in counts)))  # [row][count]
    assert all(correct[i][i // 2 % len(counts)] for i in range(0, 8, 2)) and not any(map(any, correct[1::2]))

    def group(rows):
        n = len(rows)
        fewest = [next((m for m, ok in zip(counts, row) if ok), min(counts)) for row in rows]
        return {
            "n": n,
            "accuracy": {str(m): sum(row[i] for row in rows) / n for i, m in enumerate(counts)},
            "oracle_accuracy": sum(any(row) for row in rows) / n,
            "oracle_mean_tokens": sum(fewest) / n,
        }

    expected = {"all": group(correct)}
    for t in dict.fromkeys(batch.question_types):
        expected[t] = group([row for row, q in zip(correct, batch.question_types) if q == t])
    for name, want in expected.items():
        got = report["all"] if name == "all" else report["types"][name]
        assert {k: got[k] for k in want} == want, name  # the same integer ratios
    assert "| oracle (mean tokens) |" in (out / "report.md").read_text()


def test_score_per_count_is_greedy_at_that_count(mqt_dir):
    """A random MQT-LLaVA (its answers change with m): rows answered by greedy decoding at m = 4 score right at
    4 and exactly where greedy at another m gives the same tokens."""
    processor = processor_for_queries(tiny_processor(), M)
    model = MQTLlavaForConditionalGeneration.from_pretrained(mqt_dir).eval()
    counts = (2, 4, 8, M)
    collate = Collator(processor, M, 2048, "A chat")
    synthetic = SyntheticExamples(6, seed=1, turns=1)
    examples = [synthetic.example(i, BadSamples("fail")) for i in range(6)]
    greedy = {}
    for m in counts:
        greedy[m] = []
        for ex in examples:
            (embeds,), (labels,) = spliced(model, collate([ex], BadSamples("fail")), m)
            start = int((labels != -100).nonzero()[0])
            greedy[m].append(reference_greedy(model, embeds[:start].detach(), 2))
    # The rows, answered with greedy at 4: labels on those 2 tokens only (no end-of-sequence token).
    batch = collate(examples, BadSamples("fail"))
    inputs = {k: v.clone() for k, v in batch.inputs.items()}
    for b in range(len(examples)):
        start = int((inputs["labels"][b] != -100).nonzero()[0])
        inputs["input_ids"][b, start : start + 2] = torch.tensor(greedy[4][b])
        inputs["labels"][b] = -100
        inputs["labels"][b, start : start + 2] = torch.tensor(greedy[4][b])
    patched = fastnest.patch(model, num_tokens=counts).eval()
    got = score_batch(patched, Batch(inputs, batch.question_types, batch.where), QueryCounts(M, counts))
    expected = torch.tensor([[greedy[m][b] == greedy[4][b] for m in counts] for b in range(len(examples))])
    assert got[:, 1].all() and not expected.all()  # the counts disagree somewhere
    assert torch.equal(got, expected)


def test_analyze_scales_override_and_a_count_beyond_m(trained, tmp_path, capsys):
    run, _ = trained
    base = ["analyze", "--model", str(run / "model"), "--samples", "2", "--device", "cpu", "--output-dir"]
    assert main([*base, str(tmp_path / "a"), "--scales", "1,3,16"]) == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["scales"] == [1, 3, 16]
    assert main([*base, str(tmp_path / "b"), "--scales", "2,17"]) == 2
    assert "--scales 2,17: token count 17 is not allowed" in capsys.readouterr().err


def test_built_in_mqt_run_end_to_end(tmp_path):
    """No --model: a tiny MQT-LLaVA from scratch (M = 144) on the built-in data, with the analysis per m."""
    run = tmp_path / "run"
    cmd = ["train", "--connector", "mqt", "--steps", "1", "--batch-size", "1", "--eval-samples", "4"]
    assert main([*cmd, "--no-progress", "--device", "cpu", "--output-dir", str(run)]) == 0
    counts = [2, 4, 8, 16, 36, 64, 144]
    (record,) = records(run)
    assert [int(s) for s in record["scale_losses"]] == counts  # the default: the log-spaced counts, all at once
    report = json.loads((run / "report.json").read_text())
    assert report["scales"] == counts and report["num_samples"] == 4 and "oracle_accuracy" in report["all"]
    assert not any("designed_granularity" in g for g in report["types"].values())  # pooled scales, not counts
    settings = json.loads((run / "model" / "fastnest.json").read_text())
    assert settings["connector"] == "mqt" and settings["num_queries"] == 144
    assert settings["num_tokens"] == ",".join(map(str, counts))
    model = AutoModelForImageTextToText.from_pretrained(run / "model")
    assert isinstance(model, MQTLlavaForConditionalGeneration) and model.config.model_type == "mqt_llava"
    processor = AutoProcessor.from_pretrained(run / "model")
    inputs = processor(images=[torch.zeros(48, 48, 3, dtype=torch.uint8).numpy()], text=["USER: <image> what"])
    assert inputs["input_ids"][0].count(processor.tokenizer.image_token_id) == 144  # M placeholders per image


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llava") / "model")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-tokens", "2,4"], "--num-tokens is an option of --connector mqt (the query transformer); pass "
         "--connector mqt"),
        (["--num-queries", "16"], "--num-queries is an option of --connector mqt"),
        (["--query-keys", "features"], "--query-keys is an option of --connector mqt"),
        (["--connector", "mqt", "--scales", "1,9"], "--scales is an option of --connector pooled (the pooled grid's "
         "scales); with --connector mqt the token counts are --num-tokens"),
        (["--connector", "mqt", "--num-tokens", "random:x"], "--num-tokens must be 'released', 'random:K'"),
        (["--connector", "mqt", "--num-tokens", "2,-4"], "got '2,-4'"),
        (["--connector", "mqt", "--num-queries", "50"], "--num-queries 50: processor_for_queries needs num_queries"),
        (["--connector", "mqt", "--model", "MQT", "--num-queries", "4"], "the model of --model"),
        (["--connector", "mqt", "--model", "MQT", "--num-tokens", "2,17"], "--num-tokens 2,17: token count 17 is not "
         "allowed by a query transformer with 16 queries"),
        (["--connector", "mqt", "--model", "MQT", "--num-tokens", "random:9"], "--num-tokens random:9: ('random', k) "
         "needs an int k in 1..8"),
        (["--model", "MQT"], "is a 'mqt_llava' model, trained with --connector mqt; got --connector pooled: pass "
         "--connector mqt"),
        (["--connector", "mqt", "--model", "LLAVA"], "is a 'llava' model, trained with --connector pooled; got "
         "--connector mqt"),
    ],
)  # fmt: skip
def test_each_connector_s_options_only_with_it(tmp_path, mqt_dir, llava_dir, capsys, extra, message):
    extra = [{"MQT": str(mqt_dir), "LLAVA": str(llava_dir)}.get(a, a) for a in extra]
    cmd = ["train", *extra, "--steps", "1", "--no-progress", "--no-analyze", "--output-dir", str(tmp_path / "r")]
    assert main(cmd) == 2
    assert message in capsys.readouterr().err
