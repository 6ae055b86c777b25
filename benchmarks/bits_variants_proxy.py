"""Cheap screening of bitsN codec variants on the selection parts (issue 24 item 2; exploration).

One float32 forward pass over the first `--tokens` tokens of each kind's **selection** part
(`measure.reconstruction.capture_states`), then every token after the sinks coded by each variant
(`reconstruct`, window 0), and the relative error of each layer's attention output **after o_proj**
(what the next layer reads) with the real queries when only K or only V is decoded; prints the root
mean square over layers and the stored bytes. Variants (budget N = 2, 3, 4):

- `old`: bitsN before this change: K pca N b query-weighted with one allocation by head-averaged
  importance (each head's directions in variance order), V rotated N-bit codebook, fp16 scales;
- `order`: as `old`, K directions in each head's own order of importance (`cache.build.pca_codebook`
  now);
- `fit`: as `order`, V's codebook refitted by Lloyd's iteration on the rotated, rms-normalised
  values of the text itself (an upper bound on what a calibrated V codebook could gain);
- `vpca`, `vpca-o`: as `order`, V on its calibrated principal directions with bits by variance,
  or by variance x the energy o_proj gives each direction (u^T W_o^T W_o u, summed over the query
  heads of the KV head);
- `byte`: one-byte scales at N bits (8 bits per vector fewer stored);
- `byte+`: one-byte scales, N + 1/8 code bits on K and V (bits4 and bits3 now);
- `byte-K+`, `byte-V+`: one-byte scales, the spare 1/4 bit on K only or on V only (`byte-V+` is
  bits2 now);
- `bitsN`: the shipped preset.

    nice -n 10 python benchmarks/bits_variants_proxy.py --kinds code --tokens 512 --budgets 2,4

Reads only selection parts; it chooses nothing (KL on the selection parts chooses:
`select_kinds_codecs.py`).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

VARIANTS = ("old", "order", "fit", "vpca", "vpca-o", "byte", "byte+", "byte-K+", "byte-V+", "bitsN")


def spec_for(variant: str, n: int) -> dict | str:
    q = {"key_space": "pre_rope", "weight": "query"}
    if variant == "bitsN":
        return f"bits{n}"
    if variant in ("old", "order", "fit", "vpca", "vpca-o"):
        return {"key": {"method": "pca+codebook", "bits": n, **q}, "value": {"method": "rotated+codebook", "bits": n}}
    kb, vb = {"byte": (n, n), "byte+": (n + 0.125, n + 0.125), "byte-K+": (n + 0.25, n),
              "byte-V+": (n, n + 0.25)}[variant]
    return {"key": {"method": "pca+codebook", "bits": kb, "scale_bits": 8, **q},
            "value": {"method": "rotated+codebook", "bits": vb, "scale_bits": 8}}


def head_averaged_order_pca(bits, basis, spectrum, mean, query_energy=None, scale_bits=16):
    """`cache.build.pca_codebook` as it was: widths from the head-averaged importance of directions
    taken in each head's variance order."""
    from kvcompress.cache.build import _pair_averaged
    from kvcompress.codecs import AllocatedCodebookCodec, allocate_bits
    from kvcompress.codecs.centering import Centered
    from kvcompress.codecs.composed import ComposedCodec
    from kvcompress.codecs.lowrank import LowRankProjection

    u, lam, m = basis.double(), spectrum.double(), mean.double()
    cov = u @ torch.diag_embed(lam) @ u.transpose(-1, -2) - m[:, :, None] * m[:, None, :]
    variance, vectors = torch.linalg.eigh(cov)
    variance, vectors = variance.flip(-1), vectors.flip(-1)
    variance = variance.clamp_min(variance.amax() * 1e-10 + 1e-30)
    importance = variance
    if query_energy is not None:
        weight = _pair_averaged(query_energy.double())
        importance = variance * (vectors.square() * weight[:, :, None]).sum(1)
        importance = importance / importance.sum(-1, keepdim=True) * variance.sum(-1, keepdim=True)
    widths = allocate_bits(importance.mean(0), round(bits * basis.shape[1]))
    return ComposedCodec(Centered(mean, LowRankProjection(vectors.float())),
                         AllocatedCodebookCodec(widths=widths, std=variance.sqrt().float(), scale_bits=scale_bits))


def fitted_books(capture, seed: int = 0) -> dict[int, torch.Tensor]:
    """Lloyd codebooks (2, 3, 4 bits) of the rotated, rms-normalised values of every layer."""
    from kvcompress.codecs.lloyd_max import gaussian_codebook
    from kvcompress.codecs.rotation import RandomizedHadamard, layer_seed

    samples = []
    for i, v in enumerate(capture.values):
        x = RandomizedHadamard(seed=layer_seed(seed, i)).forward(v.float())
        samples.append((x / x.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)).reshape(-1)[::7])
    u = torch.cat(samples).double()
    books = {}
    for b in (2, 3, 4):
        c = gaussian_codebook(b).double()
        for _ in range(50):
            idx = torch.bucketize(u, (c[1:] + c[:-1]) / 2)
            sums = torch.zeros_like(c).index_add_(0, idx, u)
            counts = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(u))
            c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        books[b] = c.float()
    return books


def value_pca_builder(original, out_energy):
    """build_codec with V (rotated+codebook specs) on calibrated principal directions instead."""
    from kvcompress.codecs import AllocatedCodebookCodec, allocate_bits
    from kvcompress.codecs.centering import Centered
    from kvcompress.codecs.composed import ComposedCodec
    from kvcompress.codecs.lowrank import LowRankProjection

    def build(spec, *, layer_idx=0, kind="value", artifact=None, head_dim=None):
        if kind != "value" or spec.method != "rotated+codebook":
            return original(spec, layer_idx=layer_idx, kind=kind, artifact=artifact, head_dim=head_dim)
        u, lam = artifact.basis("value", layer_idx).double(), artifact.spectrum("value", layer_idx).double()
        m = artifact.mean("value", layer_idx)
        cov = u @ torch.diag_embed(lam) @ u.transpose(-1, -2) - m.double()[:, :, None] * m.double()[:, None, :]
        variance, vectors = torch.linalg.eigh(cov)
        variance, vectors = variance.flip(-1), vectors.flip(-1)
        variance = variance.clamp_min(variance.amax() * 1e-10 + 1e-30)
        importance = variance
        if out_energy is not None:
            importance = variance * torch.einsum("hdj,hde,hej->hj", vectors, out_energy[layer_idx], vectors)
            order = importance.argsort(dim=-1, descending=True, stable=True)
            importance, variance = importance.gather(-1, order), variance.gather(-1, order)
            vectors = vectors.gather(-1, order[:, None, :].expand_as(vectors))
        widths = allocate_bits(importance.mean(0), round(spec.bits * u.shape[1]))
        return ComposedCodec(Centered(m, LowRankProjection(vectors.float())),
                             AllocatedCodebookCodec(widths=widths, std=variance.sqrt().float()))

    return build


def errors_after_o_proj(capture, pairs, o_proj) -> tuple[float, float]:
    from kvcompress.measure.reconstruction import attention_output

    sums = {"K": [], "V": []}
    for idx, (k_hat, v_hat) in enumerate(pairs):
        n = k_hat.shape[2]
        k, v, q = capture.keys[idx][:, :, :n], capture.values[idx][:, :, :n], capture.queries[idx][:, :, :n]
        scaling, window = capture.scalings[idx], capture.sliding_windows[idx]

        def project(a):  # (B, Hq, T, D) -> (B, T, hidden)
            B, Hq, T, D = a.shape
            return a.permute(0, 2, 1, 3).reshape(B, T, Hq * D).double() @ o_proj[idx].T

        exact = project(attention_output(q, k, v, scaling, window))
        for name, (kk, vv) in (("K", (k_hat, v)), ("V", (k, v_hat))):
            err = (project(attention_output(q, kk, vv, scaling, window)) - exact).pow(2).sum() / exact.pow(2).sum()
            sums[name].append(err.item())
    return tuple(math.sqrt(sum(x) / len(x)) for x in (sums["K"], sums["V"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="code")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--budgets", default="2,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        parser.exit(2, f"bits_variants_proxy.py: --variants: unknown {bad}; use some of {', '.join(VARIANTS)}\n")

    import kvcompress.cache.build as build
    import kvcompress.cache.cache as cache_module
    from kvcompress import load_model
    from kvcompress.calibration import embedded_artifact
    from kvcompress.codecs.codebook import CodebookCodec
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.reconstruction import capture_states, reconstruct
    from kvcompress.presets import load_spec

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    artifact = embedded_artifact(model)
    cfg = model.config
    heads, q_heads = cfg.num_key_value_heads, cfg.num_attention_heads
    dim = cfg.hidden_size // q_heads
    o_proj, out_energy = {}, {}
    for i, layer in enumerate(model.model.layers):
        w = layer.self_attn.o_proj.weight.detach().double()  # (hidden, Hq * D)
        o_proj[i] = w
        per_q = w.reshape(w.shape[0], q_heads, dim).permute(1, 2, 0)  # (Hq, D, hidden)
        out_energy[i] = (per_q @ per_q.transpose(1, 2)).reshape(heads, q_heads // heads, dim, dim).sum(1)
    originals = build.pca_codebook, cache_module.build_codec, CodebookCodec.centroids
    for kind in args.kinds.split(","):
        capture = capture_states(model, corpus_tokens(tokenizer, "selection", args.tokens, kind=kind))
        books = fitted_books(capture) if "fit" in variants else {}
        for n in (int(b) for b in args.budgets.split(",")):
            for variant in variants:
                if variant == "old":
                    build.pca_codebook = head_averaged_order_pca
                if variant == "fit":
                    CodebookCodec.centroids = lambda self, device="cpu", dtype=torch.float32: \
                        books[self.bits].to(device=device, dtype=dtype)
                if variant in ("vpca", "vpca-o"):
                    cache_module.build_codec = value_pca_builder(originals[1],
                                                                 out_energy if variant == "vpca-o" else None)
                try:
                    pairs, memory = reconstruct(model, load_spec(spec_for(variant, n)), capture, artifact=artifact)
                finally:
                    build.pca_codebook, cache_module.build_codec, CodebookCodec.centroids = originals
                k_err, v_err = errors_after_o_proj(capture, pairs, o_proj)
                print(f"{kind} N={n} {variant}: K {k_err:.4f} V {v_err:.4f} stored bytes {memory['stored_bytes']:,}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
