"""lmms-eval's ``fastnest`` model on tiny saved checkpoints, called with lmms-eval's own ``Instance`` requests:
log-likelihoods and greedy generations at a scale against the unpatched model fed each image as that scale's
tokens (``tools/m3_reference.py`` pooling, ``tools/mqt_reference.py`` query outputs), spliced into the prompt
written out here. Skipped where lmms-eval is not installed (CI installs it: scripts/install.sh)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytest.importorskip("lmms_eval.api.model")
Image = pytest.importorskip("PIL.Image")

from lmms_eval.api.instance import Instance  # noqa: E402
from transformers import LlavaProcessor  # noqa: E402

import fastnest  # noqa: E402
from fastnest.eval.lmms_eval_model import Fastnest  # noqa: E402
from fastnest.eval.manifest import lmms_eval_manifest  # noqa: E402
from fastnest.eval.prompts import user_prompt  # noqa: E402
from fastnest.hf.tiny import tiny_llava, tiny_llava_next, tiny_mqt_llava  # noqa: E402
from fastnest.train.template import SYSTEM_V1  # noqa: E402
from fastnest.train.tiny_processor import CLIPImageProcessor, word_tokenizer  # noqa: E402
from tools.m3_reference import reference_greedy, scaled_rows  # noqa: E402
from tools.mqt_reference import count_rows  # noqa: E402
from tools.next_reference import scaled_rows as next_scaled_rows  # noqa: E402

WORDS = "USER: ASSISTANT: what colour is it ? red blue green shape".split()
QUESTION = "what colour is it ?"
M = 16  # the MQT model's queries
STEPS = 6


def processor(crop: int, patch: int) -> LlavaProcessor:
    images = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=word_tokenizer(SYSTEM_V1.split() + WORDS),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A saved tiny LLaVA-1.5 (24x24 grid of 14-pixel patches: 576 placeholders per image) and the model."""
    proc = processor(336, 14)
    torch.manual_seed(0)
    model = tiny_llava(vocab=len(proc.tokenizer), image_token_id=proc.tokenizer.image_token_id).eval()
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, proc


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """A saved tiny LLaVA-NeXT (48-pixel crops on a 24x24 grid, 2x1 / 1x2 / 2x2 grids of crops) and the model."""
    from transformers import LlavaNextProcessor

    try:  # the PIL-backed class: no torchvision needed
        from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
    except ImportError:  # transformers 5.0
        from transformers import LlavaNextImageProcessor

    pinpoints = [[48, 96], [96, 48], [96, 96]]
    crops = LlavaNextImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=crops,
        tokenizer=word_tokenizer(SYSTEM_V1.split() + WORDS),
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    tok = proc.tokenizer
    model = tiny_llava_next(image_grid_pinpoints=pinpoints, vocab=len(tok), image_token_id=tok.image_token_id).eval()
    path = tmp_path_factory.mktemp("llava_next")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, proc


@pytest.fixture(scope="module")
def mqt(tmp_path_factory):
    """A saved tiny MQT-LLaVA (M = 16 queries on a 6x6 grid; its processor writes 16 placeholders)."""
    proc = fastnest.processor_for_queries(processor(84, 14), M)
    torch.manual_seed(0)
    model = tiny_mqt_llava(num_queries=M, vocab=len(proc.tokenizer), image_token_id=proc.tokenizer.image_token_id)
    connector = model.model.query_abstractor
    with torch.no_grad():  # a trained position table (not the sin-cos start); visual tokens as large as text's
        connector.pos_embed.add_(0.1 * torch.randn_like(connector.pos_embed))
        connector.proj.mul_(10)
    path = tmp_path_factory.mktemp("mqt")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model.eval(), proc


@pytest.fixture
def request_fixture(request):
    """The saved model of a family by name (its fixture is built on first use)."""
    return request.getfixturevalue


def images(n: int = 2) -> list:
    return [Image.new("RGB", (90 + 30 * i, 60), (200 - 60 * i, 30 + 80 * i, 40)) for i in range(n)]


def evaluator(path, scale, batch_size=1) -> Fastnest:
    """Built as lmms-eval builds it: ``--model_args`` parsed by the model's own ``create_from_arg_string``."""
    lm = Fastnest.create_from_arg_string(
        f"pretrained={path},scale={scale}", {"batch_size": batch_size, "device": "cpu"}
    )
    lm.task_dict = {"vqa": {"test": [{"images": images(1)}, {"images": images(2)}, {"images": []}]}}
    return lm


def request(kind: str, context: str, second, doc_id: int = 0, idx: int = 0) -> Instance:
    visuals = lambda doc: doc["images"]  # noqa: E731
    metadata = {"task": "vqa", "doc_id": doc_id, "repeats": 1}
    return Instance(kind, (context, second, visuals, doc_id, "vqa", "test"), idx, metadata)


def v1_prompt(text: str) -> str:
    return f"{SYSTEM_V1} USER: {text} ASSISTANT:"


def reference_embeds(model, proc, text: str, pictures: list, scale: int) -> torch.Tensor:
    """The prompt's embeddings with every image spliced in as its ``scale`` tokens (the released computation)."""
    inputs = proc(text=text, images=pictures or None, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = inputs.get("pixel_values")
    with torch.no_grad():
        if model.config.model_type == "mqt_llava":
            (embeds,), _ = count_rows(model, ids, mask, pixels, torch.full_like(ids, -100), scale)
        elif model.config.model_type == "llava_next":
            (embeds,), _ = next_scaled_rows(model, ids, mask, pixels, inputs["image_sizes"], None, scale)
        else:
            (embeds,), _, _ = scaled_rows(model, ids, mask, pixels, None, scale)
    return embeds.detach()


def reference_loglikelihood(model, proc, text: str, continuation: str, pictures: list, scale: int):
    """The continuation's loss (mean negative log-likelihood of its tokens: the last ones, one per word), and
    whether each is the argmax."""
    target = torch.tensor(proc.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    embeds = reference_embeds(model, proc, text + continuation, pictures, scale)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
        logprobs = model.lm_head(hidden[0]).float().log_softmax(-1)[-len(target) - 1 : -1]
    return -float(logprobs.gather(-1, target[:, None]).mean()), bool((logprobs.argmax(-1) == target).all())


def reference_text(model, proc, text: str, pictures: list, scale: int) -> str:
    tokens = reference_greedy(model, reference_embeds(model, proc, text, pictures, scale), STEPS)
    eos = proc.tokenizer.eos_token_id
    return proc.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)


def likeliest_word(model, proc, text: str, pictures: list, scale: int) -> str:
    """The likeliest next word after ``text`` (special tokens left out: the image token would add an image)."""
    embeds = reference_embeds(model, proc, text, pictures, scale)
    with torch.no_grad():
        logits = model.lm_head(model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state[0, -1])
    logits[[*proc.tokenizer.all_special_ids, proc.tokenizer.image_token_id]] = float("-inf")
    return proc.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


@pytest.mark.parametrize("family", ["llava", "llava_next", "mqt"])
def test_loglikelihood_at_each_scale_equals_the_reference(family, request_fixture):
    path, model, proc = request_fixture(family)
    scales = (1, 4, M) if family == "mqt" else (1, 36, 576)
    values, greedy = [], []
    for scale in scales:
        lm = evaluator(path, scale)
        prompt = v1_prompt(f"<image>\n{QUESTION}")
        likeliest = " " + likeliest_word(model, proc, prompt, images(1), scale)
        continuations = [" blue green shape", likeliest]
        got = lm.loglikelihood([request("loglikelihood", QUESTION, c, idx=i) for i, c in enumerate(continuations)])
        want = [reference_loglikelihood(model, proc, prompt, c, images(1), scale) for c in continuations]
        for (lp, is_greedy), (ref_lp, ref_greedy) in zip(got, want):
            assert lp == pytest.approx(ref_lp, abs=1e-5)
            assert is_greedy == ref_greedy
        greedy.append(got[1][1])
        values.append(got[0][0])
    assert any(greedy)  # the likeliest word is the greedy continuation (unless a special token is likelier)
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 1e-4, values  # 10x the tolerance


def test_batched_rows_with_different_image_counts_equal_one_at_a_time(mqt):
    """Two images vs one image and 16 more words: the same width before the cut, different widths after it."""
    path, model, proc = mqt
    filler = " ".join(["shape"] * M)
    reqs = [
        request("loglikelihood", f"{QUESTION} {filler}", " red", doc_id=0, idx=0),
        request("loglikelihood", QUESTION, " red", doc_id=1, idx=1),
        request("loglikelihood", QUESTION, " blue", doc_id=2, idx=2),  # no image
    ]
    texts = [v1_prompt(f"<image>\n{QUESTION} {filler}"), v1_prompt(f"<image> <image>\n{QUESTION}"), v1_prompt(QUESTION)]
    pictures = [images(1), images(2), []]
    widths = [
        proc(text=t + " red", images=p or None, return_tensors="pt")["input_ids"].shape[1]
        for t, p in zip(texts, pictures)
    ]
    assert widths[0] == widths[1] > widths[2]  # the first batch of two needs no padding before the cut
    one = evaluator(path, 4).loglikelihood(reqs)
    batched = evaluator(path, 4, batch_size=2).loglikelihood(reqs)
    for (lp, _), (lp_batched, _), text, cont, pic in zip(one, batched, texts, [" red", " red", " blue"], pictures):
        ref, _ = reference_loglikelihood(model, proc, text, cont, pic, 4)
        assert lp == pytest.approx(ref, abs=1e-5)
        assert lp_batched == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next", "mqt"])
def test_generate_until_at_each_scale_equals_greedy_generation(family, request_fixture):
    path, model, proc = request_fixture(family)
    prompt = v1_prompt(f"<image>\n{QUESTION}")
    for scale in (2, M) if family == "mqt" else (9, 144):
        lm = evaluator(path, scale)
        want = reference_text(model, proc, prompt, images(1), scale)
        options = {"max_new_tokens": STEPS, "temperature": 0, "do_sample": False}
        (got,) = lm.generate_until([request("generate_until", QUESTION, dict(options))])
        assert got == want
        words = want.split()
        if len(words) > 1:  # a stop string ends the text before it: here, after the first word
            stop = " " + words[1]
            (cut,) = lm.generate_until([request("generate_until", QUESTION, options | {"until": ["zzz", stop]})])
            assert cut == words[0]


def test_scale_is_checked_and_unknown_arguments_named(llava):
    path, _, _ = llava
    with pytest.raises(ValueError, match=r"scale 4 is not configured; configured scales: \(1, 9, 36, 144, 576\)"):
        evaluator(path, 4)
    with pytest.raises(ValueError, match=r"unknown model arguments \['scales'\] for fastnest; it takes \['pretrained'"):
        Fastnest.create_from_arg_string(f"pretrained={path},scales=36")
    lm = evaluator(path, 36)
    with pytest.raises(ValueError, match=r"generation options \['image_aspect_ratio'\] are not supported"):
        lm.generate_until([request("generate_until", QUESTION, {"image_aspect_ratio": "pad"})])
    with pytest.raises(ValueError, match=r"the context holds 1 <image> tags for 2 images"):
        lm.generate_until([request("generate_until", f"<image> {QUESTION}", {}, doc_id=1)])


def test_prompt_from_the_processor_chat_template():
    proc = processor(336, 14)
    assert user_prompt(proc, QUESTION, 2) == f"{SYSTEM_V1} USER: <image> <image>\n{QUESTION} ASSISTANT:"
    with pytest.raises(ValueError, match=r"conversation='processor' but the processor has no chat_template"):
        user_prompt(proc, QUESTION, 1, "processor")
    proc.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    assert user_prompt(proc, QUESTION, 1) == f"user: <image>\n{QUESTION}\nassistant:"
    assert user_prompt(proc, QUESTION, 0, "v1") == f"{SYSTEM_V1} USER: {QUESTION} ASSISTANT:"


def test_lmms_eval_resolves_fastnest_from_the_manifest():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()  # empty: no built-in models, no entry points
    registry.register_manifest(lmms_eval_manifest())
    assert registry.get_model_class("fastnest") is Fastnest


def test_installed_entry_point_reaches_lmms_eval():
    points = importlib.metadata.entry_points(group="lmms_eval.models", name="fastnest")
    if not points:
        pytest.skip("the installed fastnest's metadata predates its lmms_eval.models entry point: reinstall it")
    (point,) = points
    assert point.value == "fastnest.eval.manifest:lmms_eval_manifest"
    from lmms_eval.models import get_model

    assert get_model("fastnest") is Fastnest
