"""Teacher-forced quality from what vLLM returns: KL and top-1 agreement from prompt logprobs.

vLLM returns, for every prompt position, the log-probabilities of its K most likely next tokens
(`SamplingParams(prompt_logprobs=K, flat_logprobs=True)`, K <= the engine's max_logprobs), not the
whole distribution. KL(P_ref || P) is computed on the partition {tokens in both top-K lists} + {every
other token}: both probabilities of a shared token are exact, and the rest is one bucket holding
1 - (their sum). By the data-processing inequality this is a lower bound of the full-vocabulary KL;
`outside` reports the reference probability left in the bucket (the part the bound cannot see into).
No vLLM import: it works on the lists vLLM's FlatLogprobs hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """The top-K next-token log-probabilities at one prompt position, and the most likely token."""

    logprobs: dict[int, float]
    top1: int


def positions(flat) -> list[Position]:
    """One `Position` per scored prompt position (the first position, which predicts nothing, is left out).

    `flat` is vLLM's FlatLogprobs (or anything with start_indices, end_indices, token_ids, logprobs, ranks).
    """
    out = []
    for start, end in zip(flat.start_indices, flat.end_indices):
        if end == start:
            continue
        entries = {flat.token_ids[i]: flat.logprobs[i] for i in range(start, end)}
        top1 = next(flat.token_ids[i] for i in range(start, end) if flat.ranks[i] == 1)
        out.append(Position(entries, top1))
    return out


def _log1mexp_sum(logprobs: list[float]) -> float:
    """log(1 - sum(exp(logprobs))), -inf when the listed tokens hold (numerically) all the mass."""
    rest = 1.0 - sum(math.exp(lp) for lp in logprobs)
    return math.log(rest) if rest > 1e-12 else float("-inf")


@dataclass(frozen=True)
class Comparison:
    """Mean teacher-forced agreement of two runs over the same positions.

    kl: mean partition KL(reference || other) in nats (a lower bound of the full KL, see the module).
    top1: fraction of positions where both runs' most likely token is the same.
    outside: mean reference probability outside the shared top-K tokens.
    positions: how many positions were compared.
    """

    kl: float
    top1: float
    outside: float
    positions: int


def compare(reference: list[Position], other: list[Position]) -> Comparison:
    """KL, top-1 agreement and uncovered mass of `other` against `reference`, position by position."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"the runs scored {len(reference)} and {len(other)} positions; they must score the same "
                         "positions (the same prompt), at least one")
    kls, agree, outside = [], 0, []
    for ref, oth in zip(reference, other):
        shared = sorted(set(ref.logprobs) & set(oth.logprobs))
        p = [ref.logprobs[t] for t in shared]
        q = [oth.logprobs[t] for t in shared]
        kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(p, q))
        p_rest, q_rest = _log1mexp_sum(p), _log1mexp_sum(q)
        if p_rest > float("-inf"):
            kl += math.exp(p_rest) * (p_rest - q_rest) if q_rest > float("-inf") else float("inf")
        kls.append(max(kl, 0.0))
        agree += ref.top1 == oth.top1
        outside.append(math.exp(p_rest))
    n = len(kls)
    return Comparison(kl=sum(kls) / n, top1=agree / n, outside=sum(outside) / n, positions=n)
