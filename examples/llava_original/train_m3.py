"""The original LLaVA training script (``llava/train/train.py``) training M3 with fastnest's packed all-scale step.

Run it where you run ``llava/train/train_mem.py``, with the same arguments, e.g. LLaVA's
``scripts/v1_5/finetune.sh`` with ``llava/train/train_mem.py`` replaced by this file and
``--deepspeed ./scripts/zero2.json`` (not ZeRO-3: fastnest reads lm_head's and mm_projector's weights directly).
``--matryoshka_vis_token_scale 1,9,36,144,576`` (the released M3 fork's option) sets the scales, those by default.
"""

import sys

from llava.train import train as llava_train

import fastnest.integrations.llava_original as fastnest_llava


def pop_scales(argv: list[str], default=(1, 9, 36, 144, 576)) -> tuple[int, ...]:
    """The scales of ``--matryoshka_vis_token_scale A,B,...`` (removed from ``argv``: train.py does not know it)."""
    if "--matryoshka_vis_token_scale" not in argv:
        return default
    at = argv.index("--matryoshka_vis_token_scale")
    value = argv[at + 1]
    del argv[at : at + 2]
    return tuple(int(s) for s in value.split(","))


SCALES = pop_scales(sys.argv)


class M3Trainer(llava_train.LLaVATrainer):
    """LLaVA's trainer over the model patched by fastnest (train() builds it once the vision tower is loaded)."""

    def __init__(self, model, **kwargs):
        super().__init__(model=fastnest_llava.patch(model, scales=SCALES), **kwargs)


llava_train.LLaVATrainer = M3Trainer  # train() looks the trainer class up in its module

if __name__ == "__main__":
    llava_train.train(attn_implementation="flash_attention_2")  # as train_mem.py
