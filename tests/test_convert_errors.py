"""``convert_original`` refuses what it cannot convert faithfully, naming the problem, before writing anything."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastnest.hf.convert import convert_original, io
from fastnest.train.cli import main
from tools.original_llava import (
    OriginalLlava,
    original_config,
    tiny_configs,
    word_tokenizer,
    write_clip,
    write_original,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    model = OriginalLlava(*tiny_configs(vocab=len(word_tokenizer())), "llava")
    clip = write_clip(model.model.vision_tower.vision_tower, root / "clip")
    write_original(model, root / "original", original_config(model, str(clip)))
    return root


@pytest.fixture
def src(base, tmp_path):
    shutil.copytree(base / "original", tmp_path / "src")
    return tmp_path / "src"


def edit_config(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


def edit_weights(directory, drop=(), add=None):
    state = load_file(directory / "model.safetensors")
    state = {k: v for k, v in state.items() if k not in drop}
    save_file({**state, **(add or {})}, directory / "model.safetensors")


def refused(src, tmp_path, match, **options):
    with pytest.raises(ValueError, match=match):
        convert_original(src, tmp_path / "dst", **options)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu", "identity"])
def test_unknown_projector(src, tmp_path, projector):
    edit_config(src, mm_projector_type=projector)
    refused(src, tmp_path, f"mm_projector_type '{projector}' has no Hugging Face LLaVA equivalent.*'mlp2x_gelu'")


def test_missing_weights(src, tmp_path):
    edit_weights(src, drop={"model.layers.1.mlp.down_proj.weight", "lm_head.weight"})
    refused(src, tmp_path, r"missing weights .*'lm_head.weight', 'model.language_model.layers.1.mlp.down_proj.weight'")


def test_unexpected_and_misshapen_weights(src, tmp_path):
    edit_weights(src, add={"model.mm_projector.4.weight": torch.zeros(64, 64)})  # an mlp3x_gelu layer
    refused(src, tmp_path, r"unexpected weights .*\['model.mm_projector.4.weight'\]")
    edit_weights(src, drop={"model.mm_projector.4.weight"}, add={"model.norm.weight": torch.ones(32)})
    refused(src, tmp_path, r"wrong shape: \['model.norm.weight \[32\] \(expected \[64\]\)'\]")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"model_type": "llama", "mm_vision_tower": ...}, "not an original-format LLaVA checkpoint .*'llama'"),
        ({"model_type": "llava"}, "already Hugging Face's format"),
        (
            {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[48, 24]]},
            "anyres with mm_patch_merge_type 'flat'",
        ),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "needs image_grid_pinpoints"),
        ({"image_aspect_ratio": "crop"}, "image_aspect_ratio 'crop'; supported: pad, square, anyres"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
        ({"mm_vision_select_layer": ...}, "mm_vision_select_layer must be an int"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"query_abstractor_type": "qformer"}, "query_abstractor_type 'qformer'; supported: 'matry_query'"),
        ({"matryoshka_vis_token_scale": [36, 5]}, r"scale 5 .*allowed scales: \(1, 4, 9, 36\)"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "huggingface-cli download openai/clip-vit"),
        ({"torch_dtype": "bf17"}, "torch_dtype 'bf17' is not a torch dtype"),
    ],
)
def test_configs_that_do_not_describe_a_convertible_llava(src, tmp_path, fields, match):
    edit_config(src, **fields)
    refused(src, tmp_path, match)


def test_no_tower_weights_anywhere(base, tmp_path):
    torch.manual_seed(0)
    model = OriginalLlava(*tiny_configs(vocab=len(word_tokenizer())), "llava")
    clip = tmp_path / "clip-config-only"
    clip.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(base / "clip" / name, clip / name)
    write_original(model, tmp_path / "src", original_config(model, str(clip)), tower=False)
    refused(tmp_path / "src", tmp_path, "holds no vision tower weights .* and .*clip-config-only none either")


def test_a_tower_of_another_shape(src, tmp_path):
    torch.manual_seed(0)
    wide = OriginalLlava(*tiny_configs(vocab=len(word_tokenizer()), vision_hidden=48), "llava")
    clip = write_clip(wide.model.vision_tower.vision_tower, tmp_path / "wide-clip")
    refused(src, tmp_path, r"wrong shape: .*model.vision_tower.vision_tower.vision_model.*\[48", vision_tower=clip)


def test_no_tokenizer_and_a_used_destination(src, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        convert_original(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    refused(src, tmp_path / "elsewhere", "no tokenizer")


def test_a_failed_write_leaves_nothing(src, tmp_path, monkeypatch):
    def full_disk(self, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ShardWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_original(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def test_cli_reports_the_error(src, tmp_path, capsys):
    edit_config(src, mm_projector_type="linear")
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "fastnest convert: error:" in capsys.readouterr().err
