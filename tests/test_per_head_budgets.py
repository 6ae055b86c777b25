"""AdaKV-style per-head budgets (`per_head_kept`) and the emulation that measures whether they pay
(`benchmarks/per_head_budgets.py`): the layer's budget is kept in all, shares go where a by-hand
ranking puts them, and the emulation's uniform allocation drops exactly what the cache drops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvcompress.cache.eviction import per_head_kept
from kvcompress.measure.prompt import prompt_eval
from kvcompress.spec import CacheSpec, EvictionSpec, TensorSpec

ROOT = Path(__file__).resolve().parents[1]


def _by_hand(scores: torch.Tensor, n_kept: int, always: torch.Tensor, floor: float) -> torch.Tensor:
    """The same allocation by plain Python loops: per head its own `floor` share, then the best
    normalised shares over every head, one (share, head, token) at a time."""
    B, H, n = scores.shape
    out = torch.zeros(B, H, n, dtype=torch.bool)
    n_always = int(always.sum())
    own = int(floor * (n_kept - n_always))
    for b in range(B):
        shares = {}
        for h in range(H):
            total = sum(float(scores[b, h, t]) for t in range(n) if not always[t])
            for t in range(n):
                if always[t]:
                    out[b, h, t] = True
                else:
                    shares[h, t] = float(scores[b, h, t]) / total
            for h_t in sorted((k for k in shares if k[0] == h), key=lambda k: -shares[k])[:own]:
                out[b, h_t[0], h_t[1]] = True
        rest = [k for k in shares if not out[b, k[0], k[1]]]
        for h, t in sorted(rest, key=lambda k: -shares[k])[:H * (n_kept - n_always - own)]:
            out[b, h, t] = True
    return out


@pytest.mark.parametrize("floor", [0.0, 0.25, 1.0])
def test_per_head_kept_shares_the_layers_budget_by_attention_mass(floor):
    torch.manual_seed(0)
    B, H, n, n_kept = 2, 3, 40, 12
    # head 0 spreads its mass, head 2 puts it on a few tokens: distinct values, so the ranking is unique
    scores = torch.rand(B, H, n) + torch.arange(B * H * n).reshape(B, H, n) * 1e-6
    scores[:, 2] *= 1e-3
    scores[:, 2, 5:8] += 1.0
    always = torch.zeros(n, dtype=torch.bool)
    always[:2] = always[-4:] = True
    kept = per_head_kept(scores, n_kept, always, floor)
    assert torch.equal(kept, _by_hand(scores, n_kept, always, floor))
    assert (kept.sum((1, 2)) == H * n_kept).all()  # the layer's budget, in all
    assert kept[:, :, always].all()
    counts = kept.sum(-1)  # (B, H)
    if floor == 1.0:
        assert (counts == n_kept).all()  # every head its own: the uniform budget
    else:
        assert (counts[:, 2] < counts[:, 0]).all()  # the concentrated head needs fewer tokens


def test_per_head_kept_refuses_a_budget_below_the_tokens_always_kept():
    always = torch.zeros(10, dtype=torch.bool)
    always[:4] = True
    with pytest.raises(ValueError, match="n_kept"):
        per_head_kept(torch.rand(1, 2, 10), 3, always)
    with pytest.raises(ValueError, match="floor"):
        per_head_kept(torch.rand(1, 2, 10), 5, always, floor=1.5)


def _benchmark():
    spec = importlib.util.spec_from_file_location("per_head_budgets", ROOT / "benchmarks" / "per_head_budgets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["snapkv", "expected"])
def test_emulation_drops_per_head_what_the_cache_drops(tiny_llama, policy):
    """Uniform allocation in the emulation (whole prompt kept, dropped tokens masked per KV head)
    gives the compressed cache's own figures (which stores only the kept tokens); the per-head
    allocation keeps the same number of tokens in all and changes the result."""
    bench = _benchmark()
    context, tokens = 96, 40
    ids = torch.randint(3, 128, (1, context + tokens + 1), generator=torch.Generator().manual_seed(1))
    eviction = EvictionSpec(policy=policy, keep=0.4)
    full = TensorSpec(method="none")
    cache = prompt_eval(tiny_llama, ids, CacheSpec(key=full, value=full, window=16, sinks=2, eviction=eviction),
                        context, progress=False)
    base = bench.run(tiny_llama, ids, context, bench.Emulation(None, "uniform", 2, 16, 0.2))
    results = {}
    for allocation in ("uniform", "per-head"):
        emulation = bench.Emulation(eviction, allocation, 2, 16, 0.2)
        logits = bench.run(tiny_llama, ids, context, emulation)
        scores = bench.TokenScores()
        for (a, b), lb, lc in zip(bench.continuation_bounds(context, tokens), base, logits):
            scores.add(lb, lc, ids[0, a + 1:b + 1])
        results[allocation] = (scores.figures()["kl"], emulation.kept)
    kl, kept = results["uniform"]
    assert kl == pytest.approx(cache.kl, rel=1e-4, abs=1e-7)
    assert all(int(k.sum()) == k.shape[1] * cache.layers[i]["held"] for i, k in kept.items())
    kl_per_head, kept_per_head = results["per-head"]
    assert all(int(kept_per_head[i].sum()) == int(kept[i].sum()) for i in kept)
    assert kl_per_head != kl
    assert tiny_llama.config._attn_implementation == "sdpa"  # the model is switched back
