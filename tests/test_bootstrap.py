"""Block bootstrap: wider than the iid bootstrap on correlated losses, about as wide on independent ones."""

import math

import pytest
import torch

from kvcompress.measure.bootstrap import block_bootstrap_ci, block_resample_indices
from kvcompress.measure.evaluate import bootstrap_intervals


def ar1(n, rho, seed):
    """A stationary AR(1) series: x[t] = rho * x[t-1] + noise (rho 0: independent)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = noise[0] / math.sqrt(1 - rho ** 2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    return x


def width(series, block):
    (lo, hi), = block_bootstrap_ci({"x": series}, {"mean": lambda r: r["x"].mean(dim=1)}, block=block)[0].values()
    return hi - lo


def test_block_interval_is_wider_on_correlated_losses():
    x = ar1(4096, rho=0.9, seed=0)
    iid, block = width(x, 1), width(x, 64)
    # the variance of a mean of AR(1) is about (1 + rho) / (1 - rho) = 19 times the iid one: ~4.4x the width
    assert block > 2.5 * iid, (block, iid)


def test_block_and_iid_intervals_agree_on_independent_losses():
    x = ar1(4096, rho=0.0, seed=1)
    ratio = width(x, 64) / width(x, 1)
    assert 0.75 < ratio < 1.33, ratio


def test_resampled_blocks_are_consecutive_positions():
    idx = block_resample_indices(200, 64, resamples=5, seed=0)
    assert idx.shape == (5, 200) and idx.min() >= 0 and idx.max() < 200
    for row in idx:
        for start in range(0, 192, 64):
            block = row[start:start + 64]
            assert torch.equal(block, block[0] + torch.arange(64))
    assert torch.equal(block_resample_indices(30, 64, 3)[0], torch.arange(30))  # shorter than a block: whole


def test_eval_intervals_say_how_they_were_computed():
    nll_b = 2.0 + 0.1 * ar1(1000, 0.5, 2)
    nll_c = nll_b + 0.05 + 0.02 * ar1(1000, 0.5, 3)
    kl = 0.01 + 0.001 * ar1(1000, 0.5, 4).abs()
    ppl, kl_ci, method = bootstrap_intervals(nll_b, nll_c, kl)
    point = math.exp((nll_c - nll_b).mean().item()) - 1
    assert ppl[0] < point < ppl[1] and kl_ci[0] < kl.mean().item() < kl_ci[1]
    assert method == {"ci_method": "moving-block bootstrap", "block_tokens": 64, "resamples": 1000, "seed": 0,
                      "level": 0.95}
    with pytest.raises(ValueError, match="same length"):
        block_bootstrap_ci({"a": torch.zeros(3), "b": torch.zeros(4)}, {})
