"""No import runs back up the floors: constants/scales/host_memory -> dispatch -> ops -> core -> hf -> train."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastnest"
# a module may import from its own floor or lower ones only
FLOORS = [
    {"constants", "version", "scales", "host_memory", "instance_method"},
    {"dispatch"},
    {"ops"},
    {"packing", "layout", "anyres", "plan", "attention", "connectors", "step"},
    {"hf", "integrations"},  # beside each other: an integration never imports fastnest.hf (checked below)
    {"train", "__main__"},
]


def floor(module: str) -> int:
    """A name imported from the package itself (``from .. import x``) is the face of every floor: the top."""
    top = module.split(".")[0]
    return next((i for i, names in enumerate(FLOORS) if top in names), len(FLOORS))


def imports(path: Path) -> list[str]:
    """Modules (relative to fastnest) that ``path`` imports from fastnest."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - node.level])
            target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            found += [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastnest."):
            found.append(node.module.removeprefix("fastnest."))
    return [f for f in found if f and f.split(".")[0] != "_C"]


def test_no_import_runs_back_up():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":  # the package face re-exports every floor
            continue
        for target in imports(path):
            if floor(target) > floor(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_integrations_never_import_hugging_face_code():
    """Integrations with other codebases stand on the Hugging Face-free core only."""
    wrong = []
    for path in (PACKAGE / "integrations").rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        wrong += [f"{module} imports {t}" for t in imports(path) if t.split(".")[0] in ("hf", "train")]
    assert not wrong, wrong
