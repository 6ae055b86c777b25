"""RoPE-commutative pre-RoPE key codes on the selection parts (exploration; nothing shipped).

A transform commutes with every RoPE rotation only if it acts on each frequency's plane (dims i and
i + D/2) by a rotation; the principal axes of each plane's 2 x 2 covariance, taken as a rotation, are
one. Keys coded on them pre-RoPE could be decoded in O(D) per token before the kernel's rotation,
instead of bitsN's O(n x D). This compares, with bitsN's bit allocation by variance and the
reconstruction proxy of `benchmarks/kinds_codec_errors.py` (first 1024 tokens of each selection
part, float32, attention-output error with only K decoded, root mean square over layers; same bytes):
`full` (bitsN's keys), `full-nomix` (without the codec's orthogonal mixers), `plane` (per-plane axes,
no mixers: commutes) and `plane-mix` (per-plane axes with mixers inside each width group: does not
commute). Reads only selection parts; it chooses nothing.

    nice -n 10 python benchmarks/plane_key_errors.py --kinds docs --bits 4,3
"""

from __future__ import annotations

import argparse
import sys

import torch

from kinds_codec_errors import attention_errors


def plane_codebook(mix: bool):
    """A `cache.build.pca_codebook` replacement: principal axes per RoPE plane (rotations)."""
    from kvcompress.codecs.allocated import AllocatedCodebookCodec, allocate_bits
    from kvcompress.codecs.centering import Centered
    from kvcompress.codecs.composed import ComposedCodec
    from kvcompress.codecs.lowrank import LowRankProjection

    def make(bits, basis, spectrum, mean):
        u, lam, m = basis.double(), spectrum.double(), mean.double()
        cov = u @ torch.diag_embed(lam) @ u.transpose(-1, -2) - m[:, :, None] * m[:, None, :]  # (H, D, D)
        H, D, _ = cov.shape
        half = D // 2
        vectors = torch.zeros(H, D, D, dtype=torch.float64)
        variance = torch.zeros(H, D, dtype=torch.float64)
        for i in range(half):
            dims = torch.tensor([i, i + half])
            ev, v = torch.linalg.eigh(cov[:, dims][:, :, dims])  # (H, 2), (H, 2, 2) ascending
            v[:, :, 0] *= torch.sign(torch.linalg.det(v))[:, None]  # a rotation (det +1) commutes with RoPE
            for col, j in ((1, i), (0, i + half)):  # major axis -> coordinate i, minor -> i + D/2
                vectors[:, dims, j] = v[:, :, col]
                variance[:, j] = ev[:, col]
        variance = variance.clamp_min(variance.amax() * 1e-10 + 1e-30)
        return ComposedCodec(Centered(mean, LowRankProjection(vectors.float())),
                             AllocatedCodebookCodec(widths=allocate_bits(variance.mean(0), bits * D),
                                                    std=variance.sqrt().float(), mix=mix))

    return make


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="docs", help="comma list of kinds of text")
    parser.add_argument("--bits", default="4,3", help="comma list of code widths")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of each selection part")
    args = parser.parse_args(argv)
    from kvcompress.corpus import parse_kinds

    try:
        widths = [int(b) for b in args.bits.split(",")]
    except ValueError:
        widths = []
    if not widths or any(b not in (2, 3, 4) for b in widths):
        print(f"plane_key_errors: --bits {args.bits}: give a comma list of 2, 3 and 4", file=sys.stderr)
        return 2
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        print(f"plane_key_errors: {err}", file=sys.stderr)
        return 2

    import kvcompress.cache.build as build
    from kvcompress import load_model
    from kvcompress.calibration import artifact_for
    from kvcompress.codecs.allocated import AllocatedCodebookCodec
    from kvcompress.codecs.composed import ComposedCodec
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.reconstruction import capture_states, reconstruct
    from kvcompress.presets import load_spec

    shipped = build.pca_codebook

    def full_nomix(bits, basis, spectrum, mean):
        codec = shipped(bits, basis, spectrum, mean)
        return ComposedCodec(codec.transform, AllocatedCodebookCodec(widths=codec.inner.widths, std=codec.inner.std,
                                                                     mix=False))

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    artifact = artifact_for(model, load_spec("bits4"))
    print("| kind | bits | full (bitsN) | full-nomix | plane (commutes) | plane-mix |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        capture = capture_states(model, corpus_tokens(tokenizer, "selection", args.tokens, kind=kind))
        for bits in widths:
            spec = load_spec({"name": f"keys{bits}", "key": {"method": "pca+codebook", "bits": bits,
                                                             "key_space": "pre_rope"},
                              "value": {"method": "rotated+codebook", "bits": bits}})
            row = []
            for make in (shipped, full_nomix, plane_codebook(False), plane_codebook(True)):
                build.pca_codebook = make
                try:
                    pairs, _ = reconstruct(model, spec, capture, artifact=artifact)
                finally:
                    build.pca_codebook = shipped
                errors = [layer["K_layer"] for layer in attention_errors(capture, pairs)]
                row.append((sum(x * x for x in errors) / len(errors)) ** 0.5)
            print(f"| {kind} | {bits} | " + " | ".join(f"{x:.4f}" for x in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
