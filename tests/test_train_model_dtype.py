"""Training loads weights in float32 unless a dtype is named (issue 18, item 2): a checkpoint stored in fp16
comes back fp32 from ``load_model_and_processor`` (transformers 5's ``dtype=None`` would keep fp16)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from fastnest.train.model import load_model_and_processor, load_patched, save_run_model
from tests.train_helpers import TINY_SCALES, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "model"
    processor = tiny_processor()
    model = tiny_model(processor).to(torch.float16)
    save_run_model(model, processor, path, {"scales": list(TINY_SCALES)})
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # stored in fp16 indeed
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
    return path, model


def test_fp16_checkpoint_loads_in_fp32(fp16_checkpoint):
    path, saved = fp16_checkpoint
    assert LlavaForConditionalGeneration.from_pretrained(path, dtype=None).dtype == torch.float16  # "auto"
    model, _ = load_model_and_processor(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0, msg=name)  # fp16 -> fp32 is exact
    patched, _ = load_patched(path)
    assert {p.dtype for p in patched.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype, want", [(torch.bfloat16, torch.bfloat16), ("auto", torch.float16)])
def test_named_dtype_is_kept(fp16_checkpoint, dtype, want):
    model, _ = load_model_and_processor(fp16_checkpoint[0], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {want}


def test_error_bad_dtype(fp16_checkpoint):
    with pytest.raises(ValueError, match="dtype must be a torch.dtype, 'auto' or None \\(float32\\), got 'fp16'"):
        load_model_and_processor(fp16_checkpoint[0], dtype="fp16")
