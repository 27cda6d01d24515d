"""The token counts of an MQT run: ``--num-tokens`` as text and as ``patch_mqt_llava``'s ``num_tokens``, and the
log-spaced counts the analysis reports (also the default training counts).

``--num-tokens`` is text so that a run's config, settings and trajectory hold it as written: ``released`` (one
count per step from 2, 4, ..., M, as the release), ``random:K`` (K distinct counts per step from that set) or
comma-separated counts such as ``2,8,32,64`` (every one each step).
"""

from __future__ import annotations

SHOWN_COUNTS = (2, 4, 8, 16, 36, 64, 144)  # about a factor 2 apart; 36 and 144 are LLaVA's pooled scales
FORMS = "'released', 'random:K' (K counts drawn per step) or comma-separated token counts such as 2,8,32,64"


def log_spaced_counts(num_queries: int) -> tuple[int, ...]:
    """2, 4, 8, 16, 36, 64, 144 (those below M), then M."""
    return (*(c for c in SHOWN_COUNTS if c < num_queries), num_queries)


def num_tokens_option(text: str) -> str | tuple:
    """``--num-tokens`` text as ``patch_mqt_llava`` takes it: ``"released"``, ``("random", K)`` or a tuple of
    counts (checked against M there); ValueError naming the forms otherwise."""
    value = text.strip() if isinstance(text, str) else None
    if value == "released":
        return "released"
    if value is not None and value.startswith("random:") and value[len("random:") :].strip().isdigit():
        return ("random", int(value[len("random:") :]))
    parts = value.split(",") if value else []
    if parts and all(p.strip().isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(f"--num-tokens must be {FORMS}, got {text!r}")


def num_tokens_text(text: str) -> str:
    """The canonical spelling of a ``--num-tokens`` value (``"2, 8"`` -> ``"2,8"``, ``"random: 4"`` -> ``"random:4"``)."""
    option = num_tokens_option(text)
    if option == "released":
        return option
    if option[0] == "random":
        return f"random:{option[1]}"
    return ",".join(map(str, option))


def resolved_num_tokens(text: str | None, num_queries: int) -> str:
    """The run's ``--num-tokens``, or by default the log-spaced counts up to M (all trained at once)."""
    return num_tokens_text(text) if text is not None else ",".join(map(str, log_spaced_counts(num_queries)))
