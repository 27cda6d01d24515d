"""lmms-eval's ``fastnest`` model: a Hugging Face LLaVA-family checkpoint patched by ``fastnest.patch`` and
evaluated at one scale, on both of lmms-eval's paths (``loglikelihood`` and ``generate_until``).

``python -m lmms_eval --model fastnest --model_args pretrained=DIR,scale=36 --tasks ...``. The released M3
fork's lmms-eval model passes the scale to ``generate`` only, so its log-likelihoods are those of 576 tokens;
here both paths call the patched model with ``scale=``. The processor writes each image's full placeholder
run; the patched forward/generate cut it to the scale's count (``fastnest.hf.inference``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, StoppingCriteriaList

from ..hf import patch, patch_state, set_scale  # importing fastnest.hf registers the mqt_llava type
from .prompts import CONVERSATIONS, user_prompt

GENERATION_OPTIONS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Row:
    """One request: its prompt (conversation applied), the continuation to score (empty when generating)."""

    prompt: str
    continuation: str
    images: list


class Fastnest(lmms):
    """A LLaVA / MQT-LLaVA (any model type ``fastnest.patch`` knows) at ``scale`` visual tokens per image.

    Model arguments: ``pretrained`` (a Hugging Face directory or hub id: weights, config and processor),
    ``scale`` (tokens per image: a configured scale of a pooled LLaVA, a count 1..M of an MQT-LLaVA; default
    the patch's largest), ``device`` (default cuda when available, else cpu; ``cuda`` under a multi-process
    launch means this process's ``cuda:LOCAL_RANK``), ``dtype`` (``auto``: as stored), ``batch_size``,
    ``attn_implementation``, ``revision``, ``conversation`` (``auto``, ``v1``, ``processor``: see
    ``fastnest.eval.prompts.user_prompt``), ``use_cache``. Any other argument is refused, naming it.
    """

    def __init__(
        self,
        pretrained: str,
        scale: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        revision: str = "main",
        conversation: str = "auto",
        use_cache: bool = True,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            accepted = [p for p in inspect.signature(Fastnest.__init__).parameters if p not in ("self", "unknown")]
            raise ValueError(f"unknown model arguments {sorted(unknown)} for fastnest; it takes {accepted}")
        if max_batch_size is not None:
            raise ValueError("max_batch_size applies to batch_size=auto, which fastnest does not offer; drop it")
        if conversation not in CONVERSATIONS:
            raise ValueError(f"conversation must be one of {CONVERSATIONS}, got {conversation!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if scale is not None and (not isinstance(scale, int) or isinstance(scale, bool)):
            raise ValueError(f"scale must be an integer number of visual tokens per image, got {scale!r}")
        options = {"dtype": _dtype(dtype), "revision": revision}
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        self._device = _device(device)
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **options)
        self._model = patch(model).to(self._device).eval()
        if scale is not None:
            set_scale(self._model, scale)  # ValueError naming the scales the patched model allows
        self.scale = patch_state(self._model).scale
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at its end
        self.conversation, self.use_cache = conversation, bool(use_cache)
        self.batch_size_per_gpu = int(batch_size)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(loss, whether greedy decoding writes the continuation)`` with every image at ``scale``
        tokens; the loss is the mean negative log-likelihood of the continuation's tokens given the context.

        A loss, not a log-probability, because that is lmms-eval's convention: its LLaVA models return the
        forward's loss, and its multiple-choice tasks pick the choice of least value (lmms-eval issue #370)."""
        out = []
        for chunk in _chunks([self._row(r.args, scoring=True) for r in requests], self.batch_size):
            out += self._score(chunk)
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Per request the generated text, every image at ``scale`` tokens, cut before the first ``until``
        string; requests are batched with others of the same generation options."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for members in groups.values():
            until, options = self._generation_options(requests[members[0]].args[1])
            for chunk in _chunks(members, self.batch_size):
                rows = [self._row(requests[i].args, scoring=False) for i in chunk]
                for i, text in zip(chunk, self._generate(rows, until, options)):
                    out[i] = text
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fastnest's lmms-eval model answers single-round requests only")

    def _row(self, args: tuple, scoring: bool) -> Row:
        """A simple model's request: ``(context, target or doc_to_target | generation options, doc_to_visual,
        doc_id, task, split)``."""
        if len(args) != 6:
            raise ValueError(
                "fastnest answers lmms-eval's simple-model requests (context, target or generation options, "
                f"doc_to_visual, doc_id, task, split); got {len(args)} fields (acc_mutual_info's unconditional "
                "requests are not supported)"
            )
        context, second, doc_to_visual, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        continuation = (second if isinstance(second, str) else second(doc)) if scoring else ""
        images = [_image(v, task, doc_id) for v in doc_to_visual(doc)]
        if scoring and (not isinstance(continuation, str) or not continuation):
            raise ValueError(f"a log-likelihood target must be a non-empty string, got {continuation!r}")
        return Row(user_prompt(self.processor, context, len(images), self.conversation), continuation, images)

    def _inputs(self, texts: Sequence[str], rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        images = [image for row in rows for image in row.images]
        inputs = self.processor(text=list(texts), images=images or None, padding=True, return_tensors="pt")
        inputs = dict(inputs.to(self.device))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def _score(self, rows: list[Row]) -> list[tuple[float, bool]]:
        # The continuation is each row's last tokens (rows are left-padded, and the cut to the scale only
        # shortens the image runs before it), so only its logits are computed.
        whole = [row.prompt + row.continuation for row in rows]
        lengths = [
            len(self.tokenizer(text)["input_ids"]) - len(self.tokenizer(row.prompt)["input_ids"])
            for text, row in zip(whole, rows)
        ]
        inputs = _padded_left(self._inputs(whole, rows), self.tokenizer.pad_token_id or 0)
        keep = max(lengths) + 1
        logits = self.model(**inputs, scale=self.scale, logits_to_keep=keep, use_cache=False).logits
        logprobs = logits.float().log_softmax(-1)
        out = []
        for b, n in enumerate(lengths):
            target = inputs["input_ids"][b, inputs["input_ids"].shape[1] - n :].to(logprobs.device)
            rows_lp = logprobs[b, keep - 1 - n : keep - 1]
            loss = -float(rows_lp.gather(-1, target[:, None]).mean())
            out.append((loss, bool((rows_lp.argmax(-1) == target).all())))
        return out

    @torch.inference_mode()
    def _generate(self, rows: list[Row], until: list[str], options: dict) -> list[str]:
        inputs = self._inputs([row.prompt for row in rows], rows)
        if until:  # stop a row once it has written a stop string (the text is cut before it below)
            options = options | {"stopping_criteria": StoppingCriteriaList([_StopStrings(self.tokenizer, until)])}
        out = self.model.generate(**inputs, scale=self.scale, **options)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _generation_options(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        """lmms-eval's generation options as Hugging Face ``generate`` arguments: greedy unless a temperature
        above 0 is given (and ``do_sample`` is not false); ``max_new_tokens`` 1024 unless given."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_OPTIONS))
        if unknown:
            raise ValueError(
                f"generation options {unknown} are not supported by fastnest; it takes {GENERATION_OPTIONS}"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"until must be a string or a list of strings, got {gen_kwargs['until']!r}")
        temperature = float(gen_kwargs.get("temperature") or 0)
        eos = self.tokenizer.eos_token_id
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 1024),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0 and gen_kwargs.get("do_sample", True) is not False,
            "use_cache": self.use_cache,
            "eos_token_id": eos,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
        }
        if options["do_sample"]:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return until, options


class _StopStrings(StoppingCriteria):
    """Done for each row whose generated text holds one of ``until``. Decoded, not matched on token ids (as
    ``generate(stop_strings=...)`` does, which fails for tokenizers whose tokens do not spell their text).
    The generated tokens are those after the prompt generate saw, which the first call marks (one new token)."""

    def __init__(self, tokenizer, until: list[str]) -> None:
        self.tokenizer, self.until, self.start = tokenizer, until, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(u in t for u in self.until) for t in texts], device=input_ids.device)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _cut(text: str, until: list[str]) -> str:
    """``text`` before the first occurrence of any stop string."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _padded_left(inputs: dict, pad_id: int) -> dict:
    """A batch of rows that all fill their width gets one padding column on the left, so that the patched
    forward, which re-pads a shortened batch on the side it was padded, keeps every row's end aligned."""
    mask = inputs["attention_mask"]
    if mask.shape[0] == 1 or not bool(mask.all()):
        return inputs
    return inputs | {
        "input_ids": torch.nn.functional.pad(inputs["input_ids"], (1, 0), value=pad_id),
        "attention_mask": torch.nn.functional.pad(mask, (1, 0), value=0),
    }


def _image(visual, task: str, doc_id):
    from PIL import Image

    if not isinstance(visual, Image.Image):
        raise ValueError(
            f"fastnest evaluates images: document {doc_id} of task {task!r} gave a {type(visual).__name__}"
        )
    return visual.convert("RGB")


def _dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} or a torch.dtype, got {dtype!r}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def _device(device: str | None) -> torch.device:
    """The device to evaluate on; a plain ``cuda`` in a multi-process launch is this process's GPU."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen
