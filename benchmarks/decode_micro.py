"""Micro-benchmark of one layer's attention at one decode step, four ways, in one process:

dynamic:     what DynamicCache does: append the new token (torch.cat), then SDPA over (B, H, seq, D)
reconstruct: `CompressedLayer.update` decoding every block into one (B, H, seq, D) tensor, then SDPA
codes:       `kvcompress.kernels.reference.attend_compressed` (pure torch), which decodes the blocks
             `CHUNK_TOKENS` at a time and never builds the full tensor
kernel:      `kvcompress.kernels.cpu.attend`, the compiled kernel that reads the packed codes

Shapes are those of the embedded SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64), batch 1,
float32, KIVI-style quantization (keys per channel over 32 tokens, values per token over 32
channels; --bits 4 is the `int4` preset). With --preset NAME the layer takes instead the codecs,
window, sinks, block size and key space of layer --layer of a cache with that preset on the
embedded model (which loads the model and its calibration artifact): e.g. `bits4`, whose keys are
pre-RoPE and re-rotated to their positions with the model's own cos/sin tables ("kernel GB/s"
then counts the stored codes and scales, sinks and window, not the cos/sin rows and the folded
per-layer matrices the kernel also reads). Each timing is the median over --iters calls, and the
calls of the four ways alternate, so a noisy machine slows them alike. A buffer of --flush-mib
MiB is rewritten before every call so that, as inside a model (whose weights stream through the
CPU's caches at every step), the cache is not already in the CPU's caches; make it larger than
the last-level cache for figures that read from memory.

Bandwidth: "kernel GB/s" is the bytes the kernel must read (codes, scales and zero points of
K and V, sinks and window) divided by its median time; "copy GB/s" is the bytes read by
copying a 256 MiB float32 tensor into a preallocated one, divided by its median time. The copy
takes its turn in the same interleaved rounds as the four ways, so load on the machine affects
both alike.

    python benchmarks/decode_micro.py --tokens 2048,4096,8192 --bits 4 --threads 1
    python benchmarks/decode_micro.py --tokens 4096 --preset bits4 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvcompress.kernels.reference import attend_compressed
from kvcompress.cache.layer import CompressedLayer
from kvcompress.codecs import stored_nbytes
from kvcompress.codecs.quant import QuantCodec
from kvcompress.kernels import cpu as cpu_kernel

B, HQ, H, D = 1, 9, 3, 64
COPY_BYTES = 256 * 1024 * 1024  # the copy that measures the machine's bandwidth: larger than its caches


def preset_layer(preset: str, layer_idx: int) -> CompressedLayer:
    """Layer `layer_idx` of a `CompressedCache` with `preset` on the embedded model (its codecs and key space)."""
    from kvcompress import CompressedCache, load_model

    model, _ = load_model()
    config = model.config
    if (config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads) != (
            HQ, H, D):
        raise SystemExit("decode_micro: --preset needs the embedded model's shapes")
    return CompressedCache(model, preset).layers[layer_idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,4096,8192", help="comma-separated tokens held by the layer")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="code width of keys and values")
    parser.add_argument("--preset", default=None,
                        help="codecs of this kvcompress preset (layer --layer of the embedded model) instead of --bits")
    parser.add_argument("--layer", type=int, default=15, help="model layer whose codecs --preset takes")
    parser.add_argument("--iters", type=int, default=30, help="calls per way (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for this script")
    parser.add_argument("--flush-mib", type=int, default=64, help="MiB rewritten before every timed call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernel.load() is None:
        raise SystemExit(f"decode_micro: the CPU kernel is not available ({cpu_kernel.unavailable_reason()})")
    flush = torch.zeros(args.flush_mib * 1024 * 1024 // 4)
    source = torch.ones(COPY_BYTES // 4)
    target = torch.zeros_like(source)  # allocated and touched once: no page faults in the timing
    template = preset_layer(args.preset, args.layer) if args.preset else None
    what = f"preset {args.preset} (layer {args.layer})" if template is not None else f"int{args.bits}"
    print(f"threads {args.threads}; keys and values {what}; flush {args.flush_mib} MiB")
    print("| tokens | dynamic ms | reconstruct ms | codes ms | kernel ms | kernel vs dynamic | codes vs dynamic "
          "| kernel GB/s | copy GB/s | kernel / copy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(0)
        keys, values = torch.randn(B, H, tokens, D, generator=gen), torch.randn(B, H, tokens, D, generator=gen)
        if template is None:
            layer = CompressedLayer(QuantCodec(args.bits, "channel", 32), QuantCodec(args.bits, "token", 32),
                                    window=128, sinks=4, block_size=32)
        else:
            layer = CompressedLayer(template.key_codec, template.value_codec, window=template.window,
                                    sinks=template.sinks, block_size=template.block_size, key_space=template.key_space)
        layer.update(keys, values)
        query = torch.randn(B, HQ, 1, D, generator=gen)
        new_k, new_v = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
        read_bytes = (stored_nbytes(layer.stored_keys) + stored_nbytes(layer.stored_values)
                      + stored_nbytes({"sk": layer.sink_keys, "sv": layer.sink_values,
                                       "wk": layer.window_keys, "wv": layer.window_values}))

        def dynamic():
            k, v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
            return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        def reconstruct():
            k, v = layer.reconstruct()
            return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        def codes():
            return attend_compressed(layer, query, None, D ** -0.5)

        def kernel():
            return cpu_kernel.attend(layer, query, None, D ** -0.5)

        torch.testing.assert_close(codes(), reconstruct(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kernel(), codes(), atol=1e-5, rtol=1e-4)
        def copy():
            return target.copy_(source)

        times = {fn: [] for fn in (dynamic, reconstruct, codes, kernel, copy)}
        for _ in range(args.iters):
            for fn, spent in times.items():
                flush.add_(1.0)
                start = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - start)
        ms = {fn.__name__: statistics.median(spent) * 1e3 for fn, spent in times.items()}
        kernel_gbs = read_bytes / (ms["kernel"] / 1e3) / 1e9
        copy_gbs = COPY_BYTES / (ms["copy"] / 1e3) / 1e9
        print(f"| {tokens} | {ms['dynamic']:.3f} | {ms['reconstruct']:.3f} | {ms['codes']:.3f} | {ms['kernel']:.3f} | "
              f"{ms['dynamic'] / ms['kernel']:.2f}x | {ms['dynamic'] / ms['codes']:.2f}x | {kernel_gbs:.2f} | "
              f"{copy_gbs:.2f} | {kernel_gbs / copy_gbs:.0%} |")


if __name__ == "__main__":
    main()
