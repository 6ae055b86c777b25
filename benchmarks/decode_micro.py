"""Micro-benchmark of one layer's attention at one decode step, three ways, in one process:

dynamic:     what DynamicCache does: append the new token (torch.cat), then SDPA over (B, H, seq, D)
reconstruct: `CompressedLayer.update` decoding every block into one (B, H, seq, D) tensor, then SDPA
codes:       `CompressedLayer.update` (window only) + `kvcompress.cache.attention.attend_compressed`,
             which decodes the blocks `CHUNK_TOKENS` at a time and never builds the full tensor

Shapes are those of the embedded SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64), batch 1,
float32, KIVI-style int4 (the `int4` preset). Each timing is the median over --iters calls, and
the calls of the three ways alternate, so a noisy machine slows them alike. A 64 MiB buffer is
rewritten before every call so that, as inside a model, the cache is not already in the CPU's
caches.

    python benchmarks/decode_micro.py --tokens 2048,4096,8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvcompress.cache.attention import attend_compressed
from kvcompress.cache.cache import CompressedLayer
from kvcompress.codecs.quant import QuantCodec

B, HQ, H, D = 1, 9, 3, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,4096,8192", help="comma-separated tokens held by the layer")
    parser.add_argument("--iters", type=int, default=30, help="calls per way (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for this script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush = torch.empty(16 * 1024 * 1024)
    print("| tokens | dynamic ms | reconstruct ms | codes ms | codes vs dynamic |")
    print("|---:|---:|---:|---:|---:|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(0)
        keys, values = torch.randn(B, H, tokens, D, generator=gen), torch.randn(B, H, tokens, D, generator=gen)
        layer = CompressedLayer(QuantCodec(4, "channel", 32), QuantCodec(4, "token", 32),
                                window=128, sinks=4, block_size=32)
        layer.update(keys, values)
        query = torch.randn(B, HQ, 1, D, generator=gen)
        new_k, new_v = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)

        def dynamic():
            k, v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
            return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        def reconstruct():
            k, v = layer.reconstruct()
            return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        def codes():
            return attend_compressed(layer, query, None, D ** -0.5)

        torch.testing.assert_close(codes(), reconstruct(), atol=1e-5, rtol=1e-4)
        times = {fn: [] for fn in (dynamic, reconstruct, codes)}
        for _ in range(args.iters):
            for fn, spent in times.items():
                flush.add_(1.0)
                start = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - start)
        ms = {fn.__name__: statistics.median(spent) * 1e3 for fn, spent in times.items()}
        print(f"| {tokens} | {ms['dynamic']:.3f} | {ms['reconstruct']:.3f} | {ms['codes']:.3f} | "
              f"{ms['dynamic'] / ms['codes']:.2f}x |")


if __name__ == "__main__":
    main()
