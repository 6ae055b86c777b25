"""One layer's decode-step attention through the CPU kernel, several caches, interleaved, as ratios.

Each cache (`int4`-style uniform codes for `int<N>`, else a preset or spec file's codecs, window,
sinks, block size and key space at layer --layer of the embedded model) holds the same random
(B, H, tokens, D) keys and values of the embedded model's shapes; the kernel's step is timed for
every cache in turn, round after round (a --flush-mib buffer rewritten before each call), and the
median time per cache and its ratio to the first cache's are printed with the load average before
and after. Ratios from one process on a loaded machine are noisy: compare runs only on the same
quiet machine.

    python benchmarks/decode_ratio.py --tokens 4096 --caches int4,bits4,bits4-post --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from kvcompress.cache.layer import CompressedLayer
from kvcompress.codecs.quant import QuantCodec
from kvcompress.kernels import cpu as cpu_kernel
from kvcompress.kernels import cpu_codebook
from kvcompress.presets import load_spec

B, HQ, H, D = 1, 9, 3, 64


def load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens held by the layer")
    parser.add_argument("--caches", default="int4,bits4,bits4-post",
                        help="comma list: int<N> (KIVI-style uniform codes) or a preset / spec file; "
                        "the first is the reference")
    parser.add_argument("--layer", type=int, default=15, help="model layer whose codecs a preset takes")
    parser.add_argument("--rounds", type=int, default=40, help="calls per cache (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--flush-mib", type=int, default=64, help="MiB rewritten before every timed call")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True): denormal floats read and made as zero (x86)")
    args = parser.parse_args()
    names = [c.strip() for c in args.caches.split(",") if c.strip()]
    for name in names:
        try:
            if not (name.startswith("int") and name[3:].isdigit()):
                load_spec(name)
            elif int(name[3:]) not in (2, 3, 4, 8):
                raise ValueError("int<N> takes N in 2, 3, 4, 8")
        except ValueError as error:
            print(f"decode_ratio: --caches {name}: {str(error).splitlines()[0]}", file=sys.stderr)
            raise SystemExit(2) from None
    torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("decode_ratio: --flush-denormal is not supported on this CPU")
    if cpu_kernel.load() is None:
        raise SystemExit(f"decode_ratio: the CPU kernel is not available ({cpu_kernel.unavailable_reason()})")
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(B, H, args.tokens, D, generator=gen), torch.randn(B, H, args.tokens, D, generator=gen)
    query = torch.randn(B, HQ, 1, D, generator=gen)
    model = None
    layers = {}
    for name in names:
        if name.startswith("int") and name[3:].isdigit():
            bits = int(name[3:])
            layer = CompressedLayer(QuantCodec(bits, "channel", 32), QuantCodec(bits, "token", 32),
                                    window=128, sinks=4, block_size=32)
        else:
            from kvcompress import CompressedCache, load_model

            if model is None:
                model, _ = load_model()
            t = CompressedCache(model, name).layers[args.layer]
            layer = CompressedLayer(t.key_codec, t.value_codec, window=t.window, sinks=t.sinks,
                                    block_size=t.block_size, key_space=t.key_space)
        layer.update(keys, values)
        if not (cpu_kernel.supports(layer) or cpu_codebook.supports(layer)):
            raise SystemExit(f"decode_ratio: the CPU kernel does not read cache {name!r}")
        layers[name] = layer
    flush = torch.zeros(args.flush_mib * 1024 * 1024 // 4)
    times = {name: [] for name in layers}
    before = load()
    for _ in range(args.rounds):
        for name, layer in layers.items():
            flush.add_(1.0)
            start = time.perf_counter()
            cpu_kernel.attend(layer, query, None, D ** -0.5)
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    first = next(iter(ms.values()))
    print(f"tokens {args.tokens}, threads {args.threads}, {args.rounds} interleaved rounds, flush denormal "
          f"{args.flush_denormal}; "
          f"load average before {before}, after {load()}")
    print("| cache | kernel ms (median) | vs first |")
    print("|---|---:|---:|")
    for name, m in ms.items():
        print(f"| {name} | {m:.3f} | {m / first:.2f}x |")


if __name__ == "__main__":
    main()
