"""Time one cache: a prefill into a fresh cache, then greedy decode steps on it.

On CUDA the device is synchronised before each clock reading. This module times single
runs; the interleaving of caches and rounds, and the ratios to `DynamicCache`, are in `run`.
It sets no global torch settings and asserts nothing about speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..compat import CACHE_KWARG
from .kinds import CacheKind, make_cache, running
from .nbytes import cache_stored_bytes


@dataclass
class Measurement:
    """One prefill + decode of one cache at one context (`round`: which interleaved round)."""

    cache: str
    context: int
    batch: int
    steps: int
    prefill_s: float
    decode_s: float
    stored_bytes: int
    round: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.steps / self.decode_s

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, kind: CacheKind, prompt: torch.Tensor) -> tuple[object, torch.Tensor, float]:
    """A fresh cache of `kind` filled with `prompt` (B, T): (cache, next tokens (B, 1), seconds)."""
    device = model.device
    prompt = prompt.to(device)
    cache = make_cache(kind, model)
    with running(kind, model):
        _sync(device)
        start = time.perf_counter()
        out = model(prompt, **{CACHE_KWARG: cache}, logits_to_keep=1, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        _sync(device)
        return cache, token, time.perf_counter() - start


@torch.inference_mode()
def decode(model, kind: CacheKind, cache, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """`steps` greedy decode steps of `cache` (of `kind`) from `token` (B, 1): (next tokens (B, 1), seconds)."""
    device = model.device
    with running(kind, model):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, **{CACHE_KWARG: cache}, logits_to_keep=1, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return token, time.perf_counter() - start


def measure(model, kind: CacheKind, prompt: torch.Tensor, steps: int) -> Measurement:
    """Prefill `prompt` (B, T) into a fresh cache, then `steps` greedy decode steps."""
    cache, token, prefill_s = prefill(model, kind, prompt)
    _, decode_s = decode(model, kind, cache, token, steps)
    return Measurement(kind.name, prompt.shape[1] + steps, prompt.shape[0], steps, prefill_s, decode_s,
                       cache_stored_bytes(cache))
