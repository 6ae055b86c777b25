"""Token eviction: scores per policy, the tokens each KV head keeps, and `Evictor`, a layer's mechanics.

`choose_kept` picks the prompt tokens each KV head keeps (sinks and the last `protected` tokens
always); `choose_in_segment` picks `block_size` of a segment leaving the window during
generation (`applies: "generation"`), scored with the latest query. `Evictor` applies them for
one `CompressedLayer`, whose storage stays in the layer. Every KV head keeps the same number of
tokens (each its own), so storage stays one (B, H, n, D) tensor per layer and transformers' one
mask per layer stays right. `per_head_kept` shares a layer's budget among its heads (AdaKV); no
cache layer stores such ragged counts yet (see docs/prompt.md, "Per-head budgets").
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

    Policies: snapkv (attention of the last `observation` queries, summed over them and over a KV
    head's query heads, max-pooled over `pooling` neighbours), tova (attention of the last query),
    expected (expected attention of a query drawn from the Gaussian fitted to the last
    `observation` queries, times the value's norm), streaming (recency), knorm (smallest key norms).

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


PER_HEAD_POLICIES = ("snapkv", "tova", "expected")  # scores that are attention mass, comparable across heads


@torch.no_grad()
def per_head_kept(scores: torch.Tensor, n_kept: int, always: torch.Tensor, floor: float = 0.2) -> torch.Tensor:
    """AdaKV-style per-head budgets: the tokens each KV head keeps when a layer's heads share one
    budget of `H * n_kept` tokens instead of keeping `n_kept` each (Feng et al. 2024, "Ada-KV").

    Each head's scores are normalised to sum 1 over the tokens it may drop (attention mass, so
    heads compare); every head keeps the `always` tokens and its own best `floor` share of the
    average scored budget (AdaKV's safeguard), and the rest of the layer's budget goes to the
    highest normalised scores over all heads together. Only for scores that are attention mass
    (`PER_HEAD_POLICIES`); the caller's storage decides what a ragged count costs (padding every
    head to the largest count is no better than keeping that count in every head).

    Args:
        scores: (B, H, n) a policy's scores (higher is kept first), non-negative.
        n_kept: tokens each head keeps on average (>= the number of `always` tokens, <= n).
        always: (n,) bool, tokens every head keeps (sinks, the window).
        floor: share in [0, 1] of the average scored budget each head keeps of its own best.

    Returns:
        (B, H, n) bool, True where a head keeps a token; each batch row keeps `H * n_kept` in all.
    """
    B, H, n = scores.shape
    n_always = int(always.sum())
    if not 0 <= floor <= 1 or not n_always <= n_kept <= n:
        raise ValueError(f"per-head budgets need 0 <= floor <= 1 and {n_always} <= n_kept <= {n}, got floor={floor}, "
                         f"n_kept={n_kept}")
    free = scores.float().clamp(min=0).masked_fill(always, 0.0)
    share = free / free.sum(-1, keepdim=True).clamp(min=1e-30)  # (B, H, n), each head sums to 1 over droppable
    share = share.masked_fill(always, float("-inf"))
    kept = always.expand(B, H, n).clone()
    own = int(floor * (n_kept - n_always))
    if own > 0:
        kept.scatter_(2, share.topk(own, dim=-1).indices, True)
    pooled = H * (n_kept - n_always - own)
    if pooled > 0:
        flat = share.masked_fill(kept, float("-inf")).reshape(B, H * n)  # (B, H*n): every head's tokens together
        kept.view(B, H * n).scatter_(1, flat.topk(pooled, dim=-1).indices, True)
    return kept


class Evictor:
    """The eviction mechanics of one `CompressedLayer`: which tokens it keeps (storage stays in the layer).

    Args:
        spec: the eviction spec (policy, budget, when it applies).
        sinks, window, block_size: the layer's (first tokens and last tokens always kept; the
            compression block).

    Attributes:
        selected: tokens at the start of the layer's window that generation-time eviction has
            already chosen (they are compressed next).
    """

    def __init__(self, spec: EvictionSpec, *, sinks: int, window: int, block_size: int):
        self.spec, self.sinks, self.window, self.block_size = spec, sinks, window, block_size
        self.selected = 0
        self._hooks: list = []

    def describe(self) -> str:
        return self.spec.describe()

    @property
    def during_generation(self) -> bool:
        """Whether tokens leaving the window are evicted too (`applies: "generation"`)."""
        return self.spec.applies == "generation"

    def add_hook(self, hook) -> None:
        """Call `hook(kept)` with the (B, H, n_kept) positions kept of every prompt evicted (for measurements)."""
        self._hooks.append(hook)

    def reset(self) -> None:
        self.selected = 0

    def keep_prompt(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept positions (B, H, n_kept), kept keys, kept values) of a (B, H, n, D) prompt scored
        with its (B, H_q, n, D) queries; every kept token after the sinks counts as selected."""
        kept = choose_kept(self.spec, query, keys, values, scaling, sinks=self.sinks, protected=self.window,
                           block_size=self.block_size)
        for hook in self._hooks:
            hook(kept)
        if kept.shape[2] < keys.shape[2]:
            index = kept[..., None]
            keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[3]))
            values = values.gather(2, index.expand(-1, -1, -1, values.shape[3]))
        self.selected = kept.shape[2] - min(self.sinks, kept.shape[2])
        return kept, keys, values

    def compressible(self, n_window: int) -> int | None:
        """How many of the first tokens of a window of `n_window` tokens may be compressed: with
        generation-time eviction only the selected ones, else any (None)."""
        self.selected = min(self.selected, n_window)  # a crop may have cut selected tokens
        return self.selected if self.during_generation else None

    def compressed(self, n_tokens: int) -> None:
        """The layer compressed the first `n_tokens` tokens of its window."""
        self.selected = max(0, self.selected - n_tokens)

    def pending(self, n_window: int) -> bool:
        """Whether a whole span of unselected tokens has left a window of `n_window` tokens."""
        return n_window - self.window - self.selected >= self.spec.generation_span(self.block_size)

    def select(self, query: torch.Tensor, scaling: float, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """While a span of unselected tokens has left the window, keep `block_size` of them per KV
        head (scored with the (B, H_q, 1, D) query) and drop the rest.

        Args and result: the window's (B, H, n, D) keys and values and its (B, H, n) int32
        positions (or None), with the dropped tokens removed."""
        span = self.spec.generation_span(self.block_size)
        while self.pending(keys.shape[2]):
            start, stop = self.selected, self.selected + span
            kept = choose_in_segment(self.spec, query, keys[:, :, start:stop], values[:, :, start:stop], scaling,
                                     self.block_size) + start  # (B, H, block_size) window indices
            B, H = kept.shape[:2]
            keep = torch.cat([torch.arange(start, device=kept.device).expand(B, H, start), kept,
                              torch.arange(stop, keys.shape[2], device=kept.device).expand(B, H, -1)], dim=2)
            keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[3]))
            values = values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[3]))
            if positions is not None:
                positions = positions.gather(2, keep.to(torch.long))
            self.selected += self.block_size
        return keys, values, positions
