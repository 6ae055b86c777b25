"""Token eviction: which prompt tokens a layer keeps, scored from what attention saw at prefill.

At the end of the prompt's forward pass, kvcompress's attention function hands a
`CompressedLayer` the prompt's queries; the layer calls `choose_kept` here, which scores every
prompt token per KV head with the spec's policy and returns the positions each head keeps:

    snapkv     softmax attention of the last `observation` queries (causal), summed over them and
               over the query heads of a KV head, then max-pooled over `pooling` neighbours
    tova       softmax attention of the last query, summed over the query heads of a KV head
    expected   expected attention exp(s mu.k + s^2 k'Sigma k / 2) of a query drawn from the Gaussian
               fitted (mean mu, covariance Sigma, per query head) to the last `observation` queries,
               normalised over tokens, summed over the query heads, times the value's norm
    streaming  recency: the most recent tokens (with the sinks: StreamingLLM)
    knorm      the smallest key norms (keys with a small norm tend to draw attention)

The `sinks` first tokens and the last `protected` tokens (the cache's full-precision window)
are always kept; the rest of each head's budget goes to the best-scoring tokens.

With `applies: "generation"`, every `ceil(block_size / keep)` tokens that leave the window later
keep `block_size` per KV head (`choose_in_segment`): the attention policies score them with the
latest query attention saw (TOVA-style: no later query exists yet), streaming keeps the most
recent, knorm the smallest key norms.

Every KV head of a layer keeps the same number of tokens (each its own tokens): storage stays
one (B, H, n, D) tensor per layer and transformers' one mask per layer stays right. This module
does not store or drop anything (the layer does) and does not run attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import EVICTION_POLICIES, EvictionSpec


def _grouped(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H_q, n) per query head -> (B, H_kv, n), summed over the query heads of each KV head."""
    B, Hq, n = scores.shape
    return scores.reshape(B, kv_heads, Hq // kv_heads, n).sum(2)


def _window_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, observation: int) -> torch.Tensor:
    """Causal softmax attention of the last `observation` queries over all n tokens, summed over
    those queries: (B, H_q, n) from query (B, H_q, n, D) and keys (B, H_kv, n, D)."""
    B, Hq, n, D = query.shape
    H = keys.shape[1]
    w = min(observation, n)
    q = query[:, :, n - w:].float().reshape(B, H, Hq // H, w, D)
    scores = (q @ keys.float()[:, :, None].transpose(-1, -2)) * scaling  # (B, H, rep, w, n)
    rows = torch.arange(n - w, n, device=query.device)[:, None]
    future = torch.arange(n, device=query.device)[None, :] > rows  # (w, n): keys after the query
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(3).reshape(B, Hq, n)


def score_snapkv(query, keys, values, scaling, spec: EvictionSpec) -> torch.Tensor:
    attention = _grouped(_window_attention(query, keys, scaling, spec.observation), keys.shape[1])
    if spec.pooling > 1:
        attention = F.max_pool1d(attention, spec.pooling, stride=1, padding=spec.pooling // 2)
    return attention


def score_tova(query, keys, values, scaling, spec: EvictionSpec) -> torch.Tensor:
    return _grouped(_window_attention(query, keys, scaling, 1), keys.shape[1])


def score_expected(query, keys, values, scaling, spec: EvictionSpec) -> torch.Tensor:
    B, Hq, n, D = query.shape
    H = keys.shape[1]
    w = min(spec.observation, n)
    q = query[:, :, n - w:].float()  # (B, Hq, w, D)
    mean = q.mean(2)  # (B, Hq, D)
    centred = q - mean[:, :, None]
    covariance = centred.transpose(-1, -2) @ centred / max(w - 1, 1)  # (B, Hq, D, D)
    k = keys.float().repeat_interleave(Hq // H, dim=1)  # (B, Hq, n, D)
    linear = (k @ mean[..., None])[..., 0] * scaling  # (B, Hq, n)
    quadratic = ((k @ covariance) * k).sum(-1) * (scaling * scaling / 2)
    expected = torch.softmax(linear + quadratic, dim=-1)
    return _grouped(expected, H) * values.float().norm(dim=-1)


def score_streaming(query, keys, values, scaling, spec: EvictionSpec) -> torch.Tensor:
    B, H, n, _ = keys.shape
    return torch.arange(n, device=keys.device, dtype=torch.float32).expand(B, H, n)


def score_knorm(query, keys, values, scaling, spec: EvictionSpec) -> torch.Tensor:
    return -keys.float().norm(dim=-1)


SCORERS = {"snapkv": score_snapkv, "tova": score_tova, "expected": score_expected,
           "streaming": score_streaming, "knorm": score_knorm}
assert tuple(SCORERS) == EVICTION_POLICIES, "every policy the spec allows has a scorer"


def kept_count(spec: EvictionSpec, n_tokens: int, sinks: int, protected: int, block_size: int) -> int:
    """Tokens each KV head keeps of an `n_tokens`-token prompt: the spec's budget, and never fewer
    than the sinks and the last `protected` tokens (always kept)."""
    return max(min(n_tokens, sinks + protected), spec.budget(n_tokens))


@torch.no_grad()
def choose_in_segment(spec: EvictionSpec, query: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                      scaling: float, n_keep: int) -> torch.Tensor:
    """Positions (within the segment, sorted) each KV head keeps of a segment of tokens leaving the
    window: a (B, H_kv, n_keep) long tensor.

    Args:
        query: (B, H_q, 1, D) the latest query attention saw (needed by snapkv, tova, expected).
        keys, values: (B, H_kv, n, D) the segment's post-RoPE keys and values, n >= n_keep.
    """
    if spec.policy in ("streaming", "knorm"):
        scores = SCORERS[spec.policy](query, keys, values, scaling, spec)
    else:
        B, H, n, D = keys.shape
        q = query[:, :, -1:].float().reshape(B, H, query.shape[1] // H, 1, D)
        attention = torch.softmax((q @ keys.float()[:, :, None].transpose(-1, -2)) * scaling, dim=-1)
        scores = attention.sum((2, 3))  # (B, H, n)
        if spec.policy == "expected":
            scores = scores * values.float().norm(dim=-1)
    return scores.float().topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values


@torch.no_grad()
def choose_kept(spec: EvictionSpec, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                scaling: float, *, sinks: int, protected: int, block_size: int) -> torch.Tensor:
    """Positions each KV head keeps, sorted: a (B, H_kv, n_kept) long tensor.

    Args:
        spec: the eviction spec (policy and budget).
        query: (B, H_q, n, D) post-RoPE queries of the prompt (H_q a multiple of H_kv).
        keys, values: (B, H_kv, n, D) post-RoPE keys and values of the same tokens.
        scaling: the attention's q.k factor.
        sinks: first tokens always kept.
        protected: last tokens always kept (the cache's full-precision window).
        block_size: the cache's compression block; the scored part of the budget is a multiple of it.
    """
    B, H, n, _ = keys.shape
    n_kept = kept_count(spec, n, sinks, protected, block_size)
    scores = SCORERS[spec.policy](query, keys, values, scaling, spec).float()  # (B, H, n)
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    always = torch.zeros(n, dtype=torch.bool, device=keys.device)
    always[:min(sinks, n)] = True
    always[max(n - protected, 0):] = True
    scores = scores.masked_fill(always, float("inf"))
    kept = scores.topk(n_kept, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values
