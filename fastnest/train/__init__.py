"""``fastnest train`` and ``fastnest analyze``: a minimal LLaVA trainer and the granularity analysis.

cli (the command), config (the run's options), data_synthetic (the built-in visual-question set), template
(LLaVA v1, labels on assistant turns), data_llava (conversation-format files, bad-row policy, batching, data
order), model (build/load/save), trainer (the loop), optim (AdamW per part, schedule), progress (the live
line), checkpoint (atomic, exact resume), distributed (DDP/FSDP2), prefill (every scale's answer logits in the
training step's packed pass), analyze and report. The model is reached through its patch state and adapter
(``fastnest.hf``).
"""
