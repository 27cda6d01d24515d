"""The core imports and computes with transformers absent; the Hugging Face names load lazily."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys

class BlockTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"{name} is blocked by this test")
        return None

sys.meta_path.insert(0, BlockTransformers())

import torch
import fastnest
from fastnest import (
    MatryoshkaProjector, MatryoshkaQueryTransformer, MatryoshkaScales, VarlenInfo, fused_linear_cross_entropy, grouped_cross_entropy,
    matryoshka_project, multiscale_pool, plan_matryoshka, varlen_attention,
)

torch.manual_seed(0)
spec = MatryoshkaScales(4, (1, 4, 16))
mlp = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
x = torch.randn(2, 16, 8, requires_grad=True)
pooled = matryoshka_project(x, mlp, spec)
torch.testing.assert_close(pooled, multiscale_pool(mlp(x), spec), rtol=1e-5, atol=1e-6)
assert MatryoshkaProjector(mlp, 4, (1, 4, 16))(x).shape == (2, 21, 6)
assert MatryoshkaQueryTransformer(8, 6, num_queries=9, num_heads=2, grid=4)(x, 5).shape == (2, 5, 6)
ids = torch.tensor([[5, *[9] * 16, 6, 7]])
plan = plan_matryoshka(ids, None, ids.clone().masked_fill(ids == 9, -100), image_token_id=9, spec=spec, num_images=1)
q = torch.randn(plan.packed.total, 2, 4)
out = varlen_attention(q, q, q, VarlenInfo.from_packed(plan.packed))
hidden, weight = torch.randn(plan.packed.targets.numel(), 4), torch.randn(11, 4)
targets = plan.packed.targets % 11
loss, per_scale = fused_linear_cross_entropy(hidden, weight, targets, plan.packed.target_group, 3)
ref, _ = grouped_cross_entropy(hidden @ weight.T, targets, plan.packed.target_group, 3)
torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
(pooled.sum() + out.sum()).backward()
assert not [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]
try:
    fastnest.patch_llava
except ImportError as e:
    assert "blocked" in str(e), e
else:
    raise AssertionError("fastnest.patch_llava imported without transformers")
print("core ok")
"""


def test_core_imports_and_runs_without_transformers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("core ok")


def test_hf_names_are_served_lazily():
    import fastnest
    import fastnest.hf

    for name in ("patch_llava", "patch", "unpatch", "set_scale", "patch_state", "PATCHES", "MatryoshkaCausalLMOutput"):
        assert getattr(fastnest, name) is getattr(fastnest.hf, name)
