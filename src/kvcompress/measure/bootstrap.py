"""Confidence intervals of means over token positions, by a moving-block bootstrap (Kuensch 1989).

Neighbouring tokens' losses are correlated, so resampling positions independently gives intervals
that are too narrow. Each resample concatenates ceil(n / block) blocks of `block` consecutive
positions, starts drawn uniformly from [0, n - block], cut to n values; `block=1` is the plain
bootstrap. The caller chooses the block length (default 64 tokens), which is recorded with the
interval. A series shorter than `MIN_BLOCKS` blocks gets no interval (None; "n/a" in `ci_method`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DEFAULT_BLOCK = 64
DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
MIN_BLOCKS = 4  # fewer blocks in the series: no interval
NO_INTERVAL = "n/a"  # `ci_method` of a series too short for one


def block_resample_indices(n: int, block: int, resamples: int, seed: int = 0) -> torch.LongTensor:
    """(resamples, n) position indices of moving-block resamples of a series of length n.

    `block` is clipped to n (a series shorter than a block is resampled whole).
    """
    if n < 1 or block < 1 or resamples < 1:
        raise ValueError(f"n, block and resamples must be positive, got {n}, {block}, {resamples}")
    block = min(block, n)
    n_blocks = math.ceil(n / block)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - block + 1, (resamples, n_blocks, 1), generator=gen)
    idx = starts + torch.arange(block)  # (R, n_blocks, block)
    return idx.reshape(resamples, n_blocks * block)[:, :n]


def block_bootstrap_ci(series: dict[str, torch.Tensor], stats: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                       *, block: int = DEFAULT_BLOCK, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                       ) -> tuple[dict[str, tuple[float, float] | None], dict]:
    """95% intervals of statistics of per-position series, all resampled with the same blocks.

    Args:
        series: name -> (n,) tensor; every series has the same n (positions line up).
        stats: interval name -> function that receives {series name: (R, n) resampled values}
            and returns the (R,) statistic of each resample.
        block: block length in positions.
    Returns:
        ({interval name: (low, high)}, method) where method is {"ci_method", "block_tokens",
        "resamples", "seed", "level"} as recorded in results. When n < MIN_BLOCKS * block every
        interval is None and method is {"ci_method": "n/a", "block_tokens", "tokens": n,
        "min_tokens": MIN_BLOCKS * block}.
    """
    lengths = {v.numel() for v in series.values()}
    if len(lengths) != 1:
        raise ValueError(f"all series need the same length, got {sorted(lengths)}")
    n = lengths.pop()
    if n < MIN_BLOCKS * block:
        return ({name: None for name in stats},
                {"ci_method": NO_INTERVAL, "block_tokens": block, "tokens": n, "min_tokens": MIN_BLOCKS * block})
    idx = block_resample_indices(n, block, resamples, seed)
    resampled = {name: v.double().flatten()[idx] for name, v in series.items()}  # (R, n) each
    q = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64)
    out = {}
    for name, stat in stats.items():
        lo, hi = torch.quantile(stat(resampled), q).tolist()
        out[name] = (lo, hi)
    method = {"ci_method": "moving-block bootstrap" if block > 1 else "iid bootstrap",
              "block_tokens": block, "resamples": resamples, "seed": seed, "level": LEVEL}
    return out, method


def interval_text(ci: tuple[float, float] | None, method: dict, fmt: str = ".4f") -> str:
    """'95% CI low .. high' or, for a series too short, 'no 95% CI: 64 tokens, fewer than 4 blocks of 64'."""
    if ci is None:
        return (f"no 95% CI: {method['tokens']} tokens, fewer than {MIN_BLOCKS} blocks of {method['block_tokens']}; "
                f"score {method['min_tokens']} or more for one")
    return f"95% CI {format(ci[0], fmt)} .. {format(ci[1], fmt)}"
