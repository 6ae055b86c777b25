"""Micro-benchmark of one layer's decode: the reference path vs the fast path kvcompress uses.

reference: `unpack_reference` (byte-by-byte) -> code * scale + zero -> torch.cat(sinks, blocks, window)
fast:      `QuantCodec.decode_into` (int32-view unpack, one addcmul) straight into a preallocated
           (sinks | blocks | window) tensor, as `CompressedLayer.reconstruct` does.

Shapes are those of the embedded SmolLM2-135M (3 KV heads, head_dim 64), batch 1, float32.
Times are the minimum over --iters calls (this measures the code, not a noisy machine's mean).

    python benchmarks/decode_micro.py --tokens 2048,4096
"""

from __future__ import annotations

import argparse
import time

import torch

from kvcompress.codecs.packing import unpack_reference
from kvcompress.codecs.quant import QuantCodec


def reference_decode(codec: QuantCodec, stored: dict, dtype: torch.dtype) -> torch.Tensor:
    """The original decode: byte-by-byte unpack, then code * scale + zero. (B, H, T, D)."""
    codes = unpack_reference(stored["codes"], codec.bits)
    B, H, T, D = codes.shape
    scale, zero = stored["scale"].to(dtype), stored["zero"].to(dtype)
    g = codec.group_size
    if codec.axis == "token":
        x = codes.reshape(B, H, T, D // g, g).to(dtype) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    else:
        x = codes.reshape(B, H, T // g, g, D).to(dtype) * scale.unsqueeze(-2) + zero.unsqueeze(-2)
    return x.reshape(B, H, T, D)


def best_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,4096", help="comma-separated compressed tokens per layer")
    parser.add_argument("--iters", type=int, default=30, help="calls per timing (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for this script")
    parser.add_argument("--warmup-s", type=float, default=5.0,
                        help="seconds of untimed decoding first (the first seconds of a process run slow here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, H, D, sinks, window = 1, 3, 64, 4, 128
    warm = QuantCodec(bits=4, axis="token", group_size=32)
    stored = warm.encode(torch.randn(B, H, 2048, D))
    deadline = time.perf_counter() + args.warmup_s
    while time.perf_counter() < deadline:
        reference_decode(warm, stored, torch.float32)
        warm.decode(stored, torch.float32)
    print("| tokens | bits | axis | reference ms | fast ms | speed-up |")
    print("|---:|---:|---|---:|---:|---:|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(B, H, tokens, D, generator=torch.Generator().manual_seed(0))
        sink, win = torch.randn(B, H, sinks, D), torch.randn(B, H, window, D)
        for bits in (4, 2):
            for axis in ("channel", "token"):
                codec = QuantCodec(bits=bits, axis=axis, group_size=32)
                stored = codec.encode(x)

                def reference():
                    return torch.cat([sink, reference_decode(codec, stored, torch.float32), win], 2)

                def fast():
                    out = torch.empty(B, H, sinks + tokens + window, D)
                    out[:, :, :sinks] = sink
                    codec.decode_into(stored, out[:, :, sinks:sinks + tokens])
                    out[:, :, sinks + tokens:] = win
                    return out

                diff = (reference() - fast()).abs().max().item()
                assert diff <= 1e-5, f"fast decode differs from the reference by {diff}"
                ref_ms, fast_ms = best_ms(reference, args.iters), best_ms(fast, args.iters)
                print(f"| {tokens} | {bits} | {axis} | {ref_ms:.3f} | {fast_ms:.3f} | {ref_ms / fast_ms:.1f}x |")


if __name__ == "__main__":
    main()
