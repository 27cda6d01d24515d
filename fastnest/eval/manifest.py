"""fastnest's entry in lmms-eval's ``lmms_eval.models`` entry-point group (declared in setup.py)."""

from __future__ import annotations

MODEL_ID = "fastnest"
CLASS_PATH = "fastnest.eval.lmms_eval_model.Fastnest"


def lmms_eval_manifest():
    """lmms-eval's ``ModelManifest`` naming :class:`fastnest.eval.lmms_eval_model.Fastnest` as ``fastnest``.

    lmms-eval imported here, not at the top: it loads this entry point while its model registry is being
    built, and a module-level import started from here would rebuild that registry from inside itself."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
