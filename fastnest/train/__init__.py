"""``fastnest train`` and ``fastnest analyze``: a minimal LLaVA trainer and the granularity analysis.

data_synthetic (the built-in visual-question set), template (LLaVA v1, labels on assistant turns),
data_llava (conversation-format files, bad-row policy, batching), model (build/load/save), trainer,
checkpoint (atomic, exact resume), distributed (DDP/FSDP2), prefill (every scale's answer logits in one packed
pass), analyze and report.
"""
