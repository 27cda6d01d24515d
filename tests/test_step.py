"""fastnest.step.packed_step on images of DIFFERENT layouts in one batch (two grids), Hugging Face-free:
the packed pass's loss and gradients equal a per-(row, scale) loop that builds each sequence by hand."""

import pytest
import torch
import torch.nn.functional as F

from fastnest.attention import varlen_attention
from fastnest.layout import ImageLayout, pooled_grid
from fastnest.ops.cross_entropy.naive import grouped_cross_entropy
from fastnest.ops.pooling.naive import multiscale_pool
from fastnest.scales import MatryoshkaScales
from fastnest.step import packed_step

IMG, PAD, IGN = 63, 0, -100
D, HEADS, VOCAB = 16, 2, 64
SMALL, LARGE = MatryoshkaScales(2, (1, 4)), MatryoshkaScales(4, (1, 16))  # two grids, two scales each


class TinyLM(torch.nn.Module):
    """Embedding, one causal self-attention layer with rotary-free learned positions, a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, D)
        self.pos = torch.nn.Embedding(64, D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.out = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, VOCAB)
        self.vision = torch.nn.Linear(3, D)  # "tower + connector": a linear map of each grid cell's pixel

    def block(self, x, positions, attend):
        h = x + self.pos(positions)
        q, k, v = self.qkv(h).view(-1, 3, HEADS, D // HEADS).unbind(1)
        return x + self.out(attend(q, k, v).reshape(-1, D))


class Bound:
    """TinyLM as a StepModel; each image is ``pixels [grid², 3]`` with its own grid."""

    def __init__(self, lm: TinyLM, specs):
        self.lm, self.specs = lm, specs

    def image_layouts(self, pixel_values):
        return [pooled_grid(spec) for spec in self.specs]

    def visual_rows(self, pixel_values):
        return torch.cat([multiscale_pool(self.lm.vision(p)[None], s)[0] for p, s in zip(pixel_values, self.specs)])

    def embed(self, ids):
        return self.lm.embed(ids)

    def language_model(self, embeds, position_ids, info, rows, tail=None):
        return self.lm.block(embeds, position_ids, lambda q, k, v: varlen_attention(q, k, v, info))[rows]


def reference_loss(lm: TinyLM, rows, pixels, specs):
    """Per scale, per row: the row's sequence spelled out (text embeddings, the image's pooled tokens at that
    scale), plain causal attention, token-mean CE of that scale; mean over scales."""
    images = iter(range(len(specs)))
    per_row = []
    for tokens, _ in rows:
        seqs = [[] for _ in range(2)]
        for piece in tokens:
            if piece == "img":
                i = next(images)
                pooled = multiscale_pool(lm.vision(pixels[i])[None], specs[i])[0]
                for k, (s, off) in enumerate(zip(specs[i].scales, specs[i].offsets)):
                    seqs[k].append((pooled[off : off + s], [IGN] * s))
            else:
                for k in range(2):
                    seqs[k].append((lm.embed(torch.tensor(piece)), None))
        per_row.append(seqs)
    losses = []
    for k in range(2):
        ce_sum, count = 0.0, 0
        for (_, labels), seqs in zip(rows, per_row):
            x = torch.cat([e for e, _ in seqs[k]])
            lab = []
            text = iter(labels)
            for e, img_lab in seqs[k]:
                lab += img_lab if img_lab is not None else [next(text) for _ in range(e.shape[0])]
            causal = lambda q, k_, v: F.scaled_dot_product_attention(  # noqa: E731
                *(t.transpose(0, 1) for t in (q, k_, v)), is_causal=True
            ).transpose(0, 1)
            logits = lm.head(lm.block(x, torch.arange(x.shape[0]), causal))
            target = torch.tensor(lab[1:] + [IGN])
            ce = F.cross_entropy(logits, target, ignore_index=IGN, reduction="sum")
            ce_sum, count = ce_sum + ce, count + int((target != IGN).sum())
        losses.append(ce_sum / count)
    return torch.stack(losses).mean()


def batch(rows, specs, side):
    """Padded ids/mask/labels: text pieces as given, each image as its grid² placeholders."""
    flat = []
    for tokens, labels in rows:
        ids, lab, text = [], [], iter(labels)
        images = iter(specs)
        for piece in tokens:
            if piece == "img":
                n = next(images).tokens_per_image
                ids += [IMG] * n
                lab += [IGN] * n
            else:
                ids += piece
                lab += [next(text) for _ in piece]
        specs = specs[sum(p == "img" for p in tokens) :]
        flat.append((ids, lab))
    width = max(len(i) for i, _ in flat)
    out = {k: torch.full((len(rows), width), v) for k, v in (("input_ids", PAD), ("labels", IGN))}
    out["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (ids, lab) in enumerate(flat):
        cols = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        out["input_ids"][b, cols] = torch.tensor(ids)
        out["labels"][b, cols] = torch.tensor(lab)
        out["attention_mask"][b, cols] = 1
    return out


ROWS = [  # (pieces, labels of the text positions in order); "img" = the next image
    (["img", [5, 6, 7]], [IGN, 6, 7]),
    ([[1, 2], "img", [8, 9], "img", [10]], [IGN, IGN, IGN, 9, IGN, 10]),
    ([[3, 4, 5, 6]], [IGN, 4, 5, 6]),  # text only
]
SPECS = [LARGE, SMALL, LARGE]  # images in order: row 0's, then row 1's two


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_two_grids_in_one_batch_loss_and_gradients_exact(side, share_prefix):
    torch.manual_seed(1)
    pixels = [torch.randn(s.tokens_per_image, 3) for s in SPECS]
    inputs = batch(ROWS, SPECS, side)
    lm = TinyLM()
    step = packed_step(
        Bound(lm, SPECS), **inputs, pixel_values=pixels, image_token_id=IMG, attention="sdpa", share_prefix=share_prefix
    )
    logits = lm.head(step.hidden)
    loss, per_scale = grouped_cross_entropy(logits, step.packed.targets, step.packed.target_group, 2)
    assert per_scale.shape == (2,)
    loss.backward()
    got = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    want = reference_loss(lm, ROWS, pixels, SPECS)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=2e-4, atol=1e-6, msg=n)
    # tokens run, by hand (scales (1, 16) of the large grid, (1, 4) of the small): row 0 (1 + 3) + (16 + 3) = 23;
    # row 1 its 2-token prefix once, then (1 + 2 + 1 + 1) + (4 + 2 + 16 + 1) = 28 (unshared: 2 more per scale);
    # the text-only row once: 4
    assert step.lm_tokens == (23 + 2 + 28 + 4 if share_prefix else 23 + 2 * 2 + 28 + 4)


def test_layout_checks():
    with pytest.raises(ValueError, match="at least one placeholder"):
        ImageLayout(placeholders=0, rows=1, tokens=(torch.tensor([0]),))
    with pytest.raises(ValueError, match=r"index rows outside \[0, 3\)"):
        ImageLayout(placeholders=4, rows=3, tokens=(torch.tensor([0, 3]),))
    with pytest.raises(ValueError, match="1-D int64"):
        ImageLayout(placeholders=4, rows=3, tokens=(torch.tensor([0.0]),))
    layout = pooled_grid(MatryoshkaScales(4, (16, 1, 4)))
    assert (layout.placeholders, layout.rows) == (16, 21)
    assert [t.tolist() for t in layout.tokens] == [list(range(16)), [16], [17, 18, 19, 20]]
    assert pooled_grid(MatryoshkaScales(4, (16, 1, 4))) is layout  # cached per scale set
    marker = pooled_grid(MatryoshkaScales(4, (16, 1, 4)), placeholders=1)  # one token marks the image
    assert (marker.placeholders, marker.rows) == (1, 21)
    assert [t.tolist() for t in marker.tokens] == [t.tolist() for t in layout.tokens]
