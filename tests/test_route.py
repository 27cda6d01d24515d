"""scale="auto": the budget rule, the fit, the router on disk, the routing pass and routed forward/generate."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch

import fastnest
from fastnest.hf.route import FitOptions, Router, choose, fit_router, read_router, routing_features, save_router
from fastnest.hf.route.auto import images_per_row
from fastnest.train.data_llava import BadSamples, Collator, Example, SyntheticExamples
from fastnest.train.model import default_mqt_model_and_processor, default_next_model_and_processor
from tests.train_helpers import TINY_SCALES, tiny_model, tiny_processor
from tools.m3_reference import scaled_rows


def _rule_by_hand(row: list[float], scales, budget: float) -> int:
    price = 1 / budget - 1  # per max(scales) tokens
    scores = [p - price * s / max(scales) for s, p in zip(scales, row)]
    return scales[scores.index(max(scores))]  # the first best: the fewest tokens


def test_budget_rule_by_hand_and_monotone():
    scales = (1, 9, 36, 144, 576)
    probs = torch.tensor([[0.2, 0.5, 0.9, 0.95, 0.9], [0.8, 0.8, 0.8, 0.8, 0.8], [0.1, 0.0, 0.3, 0.0, 0.6]])
    assert choose(probs, scales, 1.0) == [144, 1, 576]  # the most promising; a tie goes to fewer tokens
    assert choose(probs, scales, 0.9) == [144, 1, 576]  # price 1/9 per 576 tokens: 144's +0.05 still pays
    assert choose(probs, scales, 0.5) == [36, 1, 36]  # price 1: 576's +0.3 over 36 costs 0.94
    assert choose(probs, scales, 0.1) == [9, 1, 1]  # price 9: 36's +0.4 over 9 costs 0.42
    g = torch.Generator().manual_seed(0)
    many = torch.rand(300, 5, generator=g)
    budgets = [0.01, 0.02, 0.05, *(0.05 * i for i in range(2, 21))]
    means = []
    for b in budgets:
        chosen = choose(many, scales, b)
        assert chosen == [_rule_by_hand(r, scales, b) for r in many.tolist()]
        means.append(sum(chosen) / len(chosen))
    assert means == sorted(means) and means[0] < means[-1]


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), True, "1"])
def test_budget_out_of_range_is_refused(budget):
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        choose(torch.rand(2, 3), (1, 4, 16), budget)


def _known_scale_data(n: int, seed: int):
    """Features whose cluster fixes the smallest correct scale: cluster k is answered by scales k.. only."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    features = centres[cluster] + 0.5 * torch.randn(n, 4, generator=g)
    correct = torch.arange(3)[None, :] >= cluster[:, None]
    return features, correct, cluster


def test_fit_recovers_the_scale_known_by_construction():
    scales = (1, 4, 16)
    features, correct, _ = _known_scale_data(600, seed=0)
    state = torch.random.get_rng_state()
    router = fit_router(features, correct, scales, FitOptions(steps=300, seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    again = fit_router(features, correct, scales, FitOptions(steps=300, seed=3))
    for a, b in zip(router.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # deterministic for a seed
    test, _, cluster = _known_scale_data(300, seed=1)
    chosen = router.choose(test, budget=0.5)
    hit = sum(c == scales[int(k)] for c, k in zip(chosen, cluster)) / len(chosen)
    assert hit > 0.97


def test_router_round_trips_through_its_folder(tmp_path):
    features, correct, _ = _known_scale_data(100, seed=0)
    router = fit_router(features, correct, (1, 4, 16), FitOptions(steps=20))
    router.budget = 0.7
    folder = save_router(router, tmp_path, {"data": "test"})
    info = json.loads((folder / "router.json").read_text())
    assert info["scales"] == [1, 4, 16] and info["budget"] == 0.7 and info["routing_scale"] == 1
    assert info["fitting"] == {"data": "test"} and info["format"] == 2 and "hidden state" in info["features"]
    loaded, _ = read_router(tmp_path)
    assert loaded.budget == 0.7 and loaded.scales == (1, 4, 16)
    torch.testing.assert_close(loaded.probabilities(features), router.probabilities(features), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no router in .*fastnest route --model"):
        read_router(tmp_path / "elsewhere")
    # a format-1 router's budget meant a share of the largest probability: refused, not read under the new rule
    (folder / "router.json").write_text(json.dumps({**info, "format": 1}))
    with pytest.raises(ValueError, match="router format 1 .*reads format 2 .*refit with `fastnest route`"):
        read_router(tmp_path)


def _batch(processor, n=4, two_images_first=False):
    examples = SyntheticExamples(n, seed=11, turns=1)
    bad = BadSamples("fail")
    rows = [examples.example(i, bad) for i in range(n)]
    if two_images_first:
        first = rows[0]
        conv = [dict(first.conversations[0]), first.conversations[1]]
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
        rows[0] = Example(conv, [first.images[0], rows[1].images[0]], "two images")
    return Collator(processor, 16, max_length=200, system="A chat")(rows, bad)


def _features_by_hand(ref, inputs, scale: int) -> torch.Tensor:
    """The plain model on each row shortened to ``scale`` (tools.m3_reference): its final hidden state at the
    token before the first labelled one, the next-token max probability and entropy there."""
    embeds, labels, _ = scaled_rows(ref, **inputs, scale=scale)
    out = []
    for emb, lab in zip(embeds, labels):
        end = int((lab != -100).nonzero()[0]) - 1
        with torch.no_grad():
            h = ref.model.language_model(inputs_embeds=emb[None], use_cache=False).last_hidden_state[0, end]
            p = torch.softmax(ref.lm_head(h).float(), -1)
        out.append(torch.cat([h, p.max()[None], -(p * p.log()).sum()[None]]))
    return torch.stack(out)


def _mlp_by_hand(router: Router, features: torch.Tensor) -> list[list[float]]:
    sd = {k: v.double() for k, v in router.state_dict().items()}
    x = (features.double() - sd["mean"]) / sd["std"]
    hidden = x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return torch.sigmoid(hidden @ sd["mlp.2.weight"].T + sd["mlp.2.bias"]).tolist()


def _routed_model(processor, batch):
    """A patched tiny model with a router fitted so the batch's rows want different scales."""
    ref = tiny_model(processor, seed=1).eval()
    model = fastnest.patch_llava(copy.deepcopy(ref), scales=TINY_SCALES).eval()
    features = routing_features(model, **batch.inputs, scale=1)
    want = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    router = fit_router(features, want[: len(features)], TINY_SCALES, FitOptions(steps=400))
    return ref, model, router


def test_routing_features_and_decisions_per_image_by_hand(tmp_path):
    processor = tiny_processor()
    batch = _batch(processor, two_images_first=True)
    ref, model, router = _routed_model(processor, batch)
    features = routing_features(model, **batch.inputs, scale=1)
    torch.testing.assert_close(features, _features_by_hand(ref, batch.inputs, 1), rtol=1e-4, atol=1e-5)
    save_router(router, tmp_path, {})
    fastnest.load_router(model, tmp_path)
    rows = [_rule_by_hand(p, TINY_SCALES, 0.5) for p in _mlp_by_hand(router, features)]
    assert len(set(rows)) > 1  # the rows of one batch get different scales
    assert images_per_row(
        model, batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.inputs["pixel_values"]
    ) == [2, 1, 1, 1]
    expected = [rows[0], rows[0], rows[1], rows[2], rows[3]]  # each image takes its row's scale
    assert fastnest.route_scales(model, **batch.inputs, budget=0.5) == expected


def test_auto_forward_and_generate_equal_the_chosen_scales(tmp_path):
    processor = tiny_processor()
    batch = _batch(processor)
    _, model, router = _routed_model(processor, batch)
    save_router(router, tmp_path, {})
    fastnest.load_router(model, tmp_path)
    for budget in (None, 0.5):
        chosen = fastnest.route_scales(model, **batch.inputs, budget=budget)
        assert len(chosen) == 4
        auto = model(**batch.inputs, scale="auto", budget=budget)
        fixed = model(**batch.inputs, scale=chosen)
        assert torch.equal(auto.logits, fixed.logits) and torch.equal(auto.loss, fixed.loss)
    from fastnest.train.route_data import prompts

    prompt, _ = prompts(batch.inputs, pad_id=0)
    chosen = fastnest.route_scales(model, **prompt, budget=0.5)
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    auto = model.generate(**prompt, scale="auto", budget=0.5, **options)
    assert torch.equal(auto, model.generate(**prompt, scale=chosen, **options))
    means = [sum(fastnest.route_scales(model, **prompt, budget=b)) for b in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)]
    assert means == sorted(means)


def test_auto_runs_the_tower_once_where_no_graph_is_recorded(tmp_path):
    processor = tiny_processor()
    batch = _batch(processor)
    _, model, router = _routed_model(processor, batch)
    fastnest.load_router(model, save_router(router, tmp_path, {}))
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))

    def towers(fn):
        calls.clear()
        out = fn()
        return len(calls), out

    chosen = fastnest.route_scales(model, **batch.inputs, budget=0.5)
    with torch.no_grad():
        n, auto = towers(lambda: model(**batch.inputs, scale="auto", budget=0.5))
        assert n == 1  # the routing pass's tower outputs serve the chosen-scale pass
        assert torch.equal(auto.logits, model(**batch.inputs, scale=chosen).logits)
        assert towers(lambda: (model(**batch.inputs, scale="auto"), model(**batch.inputs, scale="auto")))[0] == 2
    assert towers(lambda: model(**batch.inputs, scale="auto", budget=0.5))[0] == 2  # grad on: the pass's own tower
    from fastnest.train.route_data import prompts

    prompt, _ = prompts(batch.inputs, pad_id=0)
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    n, auto = towers(lambda: model.generate(**prompt, scale="auto", budget=0.5, **options))
    assert n == 1
    chosen = fastnest.route_scales(model, **prompt, budget=0.5)
    assert torch.equal(auto, model.generate(**prompt, scale=chosen, **options))


@pytest.mark.parametrize("family", ["llava-next", "mqt"])
def test_auto_on_the_other_families(family, tmp_path):
    """LLaVA-NeXT (anyres crops, image_sizes) and MQT-LLaVA (query counts as scales): the rows of one batch routed
    to different scales, forward and generate equal to the same calls at those scales, one tower pass each."""
    if family == "llava-next":
        model, processor = default_next_model_and_processor(seed=1)
        model = fastnest.patch(model, scales=(1, 9, 144)).eval()
    else:
        model, processor = default_mqt_model_and_processor(1, 16, "positional")
        model = fastnest.patch(model, num_tokens=(2, 4, 16)).eval()
    spec = fastnest.patch_state(model).training_spec()
    examples, bad = SyntheticExamples(4, seed=11, turns=1), BadSamples("fail")
    batch = Collator(processor, spec.tokens_per_image, 4096, "A chat")(
        [examples.example(i, bad) for i in range(4)], bad
    )
    features = routing_features(model, **batch.inputs, scale=spec.scales[0])
    want = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    fastnest.load_router(
        model, save_router(fit_router(features, want, spec.scales, FitOptions(steps=400)), tmp_path, {})
    )
    calls = []
    fastnest.patch_state(model).adapter.vision_tower(model).register_forward_hook(lambda *_: calls.append(1))
    from fastnest.train.route_data import prompts

    prompt, _ = prompts(batch.inputs, pad_id=0)
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        for inputs, call in ((batch.inputs, model), (prompt, functools.partial(model.generate, **options))):
            chosen = fastnest.route_scales(model, **inputs, budget=0.5)
            assert len(set(chosen)) > 1
            calls.clear()
            auto = call(**inputs, scale="auto", budget=0.5)
            assert len(calls) == 1
            fixed = call(**inputs, scale=chosen)
            assert torch.equal(*(o if isinstance(o, torch.Tensor) else o.logits for o in (auto, fixed)))


def test_auto_loads_the_router_saved_beside_the_model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    processor = tiny_processor()
    batch = _batch(processor)
    _, model, router = _routed_model(processor, batch)
    model.save_pretrained(tmp_path / "model")
    loaded = fastnest.patch_llava(LlavaForConditionalGeneration.from_pretrained(tmp_path / "model"), scales=TINY_SCALES)
    with pytest.raises(ValueError, match=r"scale='auto' needs a scale router .*fastnest route --model DIR"):
        loaded(**batch.inputs, scale="auto")
    save_router(router, tmp_path / "model", {})
    out = loaded.eval()(**batch.inputs, scale="auto", budget=0.5)
    assert fastnest.patch_state(loaded).router is not None
    expected = model(**batch.inputs, scale=fastnest.route_scales(loaded, **batch.inputs, budget=0.5))
    torch.testing.assert_close(out.logits, expected.logits)


def test_auto_errors(tmp_path):
    processor = tiny_processor()
    batch = _batch(processor)
    _, model, router = _routed_model(processor, batch)
    save_router(router, tmp_path, {})
    with pytest.raises(ValueError, match=r"budget=0.5 applies to scale='auto' only"):
        model(**batch.inputs, scale=4, budget=0.5)
    other = fastnest.patch_llava(copy.deepcopy(model), scales=(1, 16))
    with pytest.raises(
        ValueError, match=r"fitted for scales \(1, 4, 16\), but the patch does not allow \[4\].*scales="
    ):
        fastnest.load_router(other, tmp_path)
    fastnest.load_router(model, tmp_path)
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        model(**batch.inputs, scale="auto", budget=2)
    small = fastnest.scaled_inputs(model, **batch.inputs, scale=4)
    with pytest.raises(ValueError, match="full-scale placeholder runs.*full-scale input_ids"):
        model(**small, pixel_values=batch.inputs["pixel_values"], scale="auto")
    with pytest.raises(ValueError, match="one int, 'auto' .* or a sequence"):
        model(**batch.inputs, scale="fast")
    model.train()
    with pytest.raises(ValueError, match="scale=auto is for inference"):
        model(**batch.inputs, scale="auto")
