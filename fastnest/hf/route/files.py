"""A router on disk, beside its model: ``DIR/router/router.safetensors`` (the head's weights and the features'
standardisation) and ``DIR/router/router.json`` (format version, scales, default budget, the feature definition
and what it was fitted on)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .features import FEATURES
from .head import Router

ROUTER_DIR, WEIGHTS, INFO = "router", "router.safetensors", "router.json"
FORMAT = 2  # 2: the budget is the price rule of head.py (1: a share of the row's largest probability)


def router_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / ROUTER_DIR


def save_router(router: Router, model_dir: str | Path, fitting: dict) -> Path:
    """Write ``router`` into ``model_dir/router/`` with ``fitting`` (JSON: data, samples, seed, options)."""
    out = router_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(out / WEIGHTS))
    info = {
        "format": FORMAT,
        "scales": list(router.scales),
        "budget": router.budget,
        "hidden": router.mlp[0].out_features,
        "num_features": router.num_features,
        "features": FEATURES,
        "routing_scale": min(router.scales),
        "fitting": fitting,
    }
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_router(path: str | Path) -> tuple[Router, dict]:
    """The router saved in ``path`` (a model directory holding ``router/``, or that folder) and its JSON."""
    path = Path(path)
    folder = path if (path / INFO).is_file() else router_dir(path)
    if not (folder / INFO).is_file():
        raise ValueError(f"no router in {path} (no {ROUTER_DIR}/{INFO}): fit one with `fastnest route --model {path}`")
    info = json.loads((folder / INFO).read_text())
    if info.get("format") != FORMAT or info.get("features") != FEATURES:
        raise ValueError(
            f"{folder / INFO}: router format {info.get('format')!r} with features {info.get('features')!r}; this "
            f"fastnest reads format {FORMAT} with features {FEATURES!r}: refit with `fastnest route`"
        )
    router = Router(info["scales"], info["num_features"], info["hidden"], info["budget"])
    router.load_state_dict(load_file(str(folder / WEIGHTS)))
    return router.eval().requires_grad_(False), info
