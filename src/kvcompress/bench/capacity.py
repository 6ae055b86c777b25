"""Capacity under a cache memory budget: the longest batch-1 context and the largest batch at a
given context that fit, from measured stored bytes, and the aggregate decode speed at that batch.

Bytes per token come from a straight line through the two longest measured contexts of each
cache (bytes = fixed + per_token * tokens, per batch row), so fixed costs (sinks, window,
residual) are not counted per token. The largest batch is then run once (capped at
`max_batch`) to measure its aggregate decode tokens/s and check that it really fits.

This module does not choose the budget or the caches (see `run`).
"""

from __future__ import annotations

import logging

from ..fingerprint import text_config
from .prompts import build_prompt
from .timing import measure

logger = logging.getLogger(__name__)


def fit_bytes(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per_token) of a line through the two longest (tokens, bytes) points."""
    (t1, b1), (t2, b2) = sorted(points)[-2:]
    per_token = (b2 - b1) / (t2 - t1)
    return b2 - per_token * t2, per_token


def capacity(model, tokenizer, kinds, summary: list[dict], *, budget_bytes: int, context: int, steps: int,
             max_batch: int, corpus: str | None = None) -> dict:
    """Longest batch-1 context and largest batch at `context` within `budget_bytes`, per cache.

    `summary`: rows with "cache", "context" and "stored_bytes" (batch 1), as `run` builds them.
    """
    limit = getattr(text_config(model), "max_position_embeddings", None)
    rows = {}
    for kind in kinds:
        points = [(r["context"], r["stored_bytes"]) for r in summary if r["cache"] == kind.name]
        if len(points) < 2:
            rows[kind.name] = {"skipped": "needs at least two measured contexts to fit bytes per token"}
            continue
        fixed, per_token = fit_bytes(points)
        longest = max(int((budget_bytes - fixed) // per_token), 0) if per_token > 0 else None
        at_context = fixed + per_token * context
        batch = int(budget_bytes // at_context) if at_context > 0 else 0
        row = {"bytes_per_token": per_token, "fixed_bytes": fixed, "longest_context": longest,
               "longest_context_within_model_limit": min(longest, limit) if limit and longest is not None else longest,
               "bytes_at_capacity_context": at_context, "largest_batch": batch,
               "measured_batch": min(batch, max_batch)}
        if row["measured_batch"] >= 1:
            b = row["measured_batch"]
            prompt, _ = build_prompt(tokenizer, context - steps, b, corpus)
            m = measure(model, kind, prompt, steps)
            row.update(aggregate_tokens_per_s=m.tokens_per_s, stored_bytes_at_batch=m.stored_bytes,
                       fits=m.stored_bytes <= budget_bytes, prefill_s=m.prefill_s)
            logger.info(f"capacity {kind.name:10s} batch {b:3d} at {context} tokens: "
                        f"{m.tokens_per_s:7.2f} tok/s aggregate, {m.stored_bytes / 2**20:.1f} MiB stored")
        rows[kind.name] = row
    return {"budget_bytes": budget_bytes, "capacity_context": context, "model_context_limit": limit,
            "caches": rows}
