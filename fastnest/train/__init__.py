"""``fastnest train``, ``fastnest analyze`` and ``fastnest plot``: a minimal LLaVA trainer, the granularity
analysis and the run's figures.

cli (the command), config (the run's options), data_synthetic (the built-in visual-question set), template
(LLaVA v1, labels on assistant turns), data_llava (conversation-format files, bad-row policy, batching, data
order), images (decoding, channels stated), model (build/load/save), query_counts (MQT's --num-tokens and the
log-spaced counts), trainer (the loop), update (one optimizer
step), guards (the non-finite guard), optim (AdamW per part, schedule), progress (the live line), metrics
(metrics.jsonl), checkpoint (atomic, exact resume), resume (the options a resume must match), signals
(SIGINT/SIGTERM), storage (output directory, full disk), distributed (DDP/FSDP2), prefill (every scale's answer
logits in the training step's packed pass), run_analysis (the analysis at the end), analyze, report, figures
(matplotlib) and plot (``fastnest plot``). The model is reached through its patch state and adapter
(``fastnest.hf``).
"""
