"""Evaluation harness integrations. ``fastnest.eval.lmms_eval_model.Fastnest`` is the ``fastnest`` model of
lmms-eval (registered through its ``lmms_eval.models`` entry points by ``fastnest.eval.manifest``); importing
this package imports neither lmms-eval nor transformers."""
