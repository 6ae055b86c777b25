"""Where bits4 loses to int4, per layer and head, on the selection part of every kind of text (exploration).

Reconstruction proxy (`kvcompress.measure.reconstruction`): one forward pass over the first
`--tokens` tokens of each kind's selection part (float32), then every token after the sinks coded
by int4, bits4, and bits4 with its key bits allocated per KV head from that head's own calibrated
spectrum (`per_head_pca`, same bytes stored; an experiment, not a shipped codec). For each, the
relative error of the attention output with the real queries when only K (or only V) is decoded,
per layer and query head. Prints the root mean square over layers and the per-layer K ratios.

    nice -n 10 python benchmarks/kinds_codec_errors.py --out runs/kinds_codec_errors.json

Reads only selection parts (text a choice may read); it chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def per_head_pca(bits: int, basis: torch.Tensor, spectrum: torch.Tensor, mean: torch.Tensor,
                 query_energy: torch.Tensor | None = None):
    """`cache.build.pca_codebook` with one bit allocation per KV head (its own spectrum) instead of
    one per layer (the head-averaged spectrum); the same number of code bits per token and head.
    By variance alone: `query_energy` (what bits4's keys now weigh directions by) is ignored."""
    from kvcompress.codecs import AllocatedCodebookCodec, allocate_bits
    from kvcompress.codecs.centering import Centered
    from kvcompress.codecs.composed import ComposedCodec
    from kvcompress.codecs.lowrank import LowRankProjection

    u, lam, m = basis.double(), spectrum.double(), mean.double()
    cov = u @ torch.diag_embed(lam) @ u.transpose(-1, -2) - m[:, :, None] * m[:, None, :]  # (H, D, D)
    variance, vectors = torch.linalg.eigh(cov)
    variance, vectors = variance.flip(-1), vectors.flip(-1)
    variance = variance.clamp_min(variance.amax() * 1e-10 + 1e-30)
    return PerHead([ComposedCodec(Centered(mean[h:h + 1], LowRankProjection(vectors[h:h + 1].float())),
                                  AllocatedCodebookCodec(widths=allocate_bits(variance[h], bits * basis.shape[1]),
                                                         std=variance[h:h + 1].sqrt().float()))
                    for h in range(basis.shape[0])])


def _per_head_class():
    from kvcompress.codecs.base import Codec

    class PerHeadCodec(Codec):
        """One codec per KV head; stored tensors named 'h{i}.NAME', each (B, 1, n, ...)."""

        def __init__(self, codecs):
            self.codecs = codecs

        @property
        def token_multiple(self) -> int:
            return max(c.token_multiple for c in self.codecs)

        def encode(self, x):  # (B, H, T, D)
            return {f"h{i}.{k}": v for i, c in enumerate(self.codecs) for k, v in c.encode(x[:, i:i + 1]).items()}

        def decode(self, stored, dtype):
            return torch.cat([c.decode({k[len(f"h{i}."):]: v for k, v in stored.items() if k.startswith(f"h{i}.")},
                                       dtype) for i, c in enumerate(self.codecs)], dim=1)

    return PerHeadCodec


def PerHead(codecs):
    return _per_head_class()(codecs)


def attention_errors(capture, pairs) -> list[dict]:
    """Per layer: relative attention-output error per query head and for the layer, K-only and V-only."""
    from kvcompress.measure.reconstruction import attention_output

    rows = []
    for idx, (k_hat, v_hat) in enumerate(pairs):
        n = k_hat.shape[2]
        k, v, q = capture.keys[idx][:, :, :n], capture.values[idx][:, :, :n], capture.queries[idx][:, :, :n]
        scaling, window = capture.scalings[idx], capture.sliding_windows[idx]
        exact = attention_output(q, k, v, scaling, window).double()  # (B, Hq, T, D)
        den = exact.pow(2).sum(dim=(0, 2, 3))
        row = {}
        for name, (kk, vv) in (("K", (k_hat, v)), ("V", (k, v_hat))):
            num = (attention_output(q, kk, vv, scaling, window).double() - exact).pow(2).sum(dim=(0, 2, 3))
            row[name] = (num / den).sqrt().tolist()
            row[name + "_layer"] = (num.sum() / den.sum()).sqrt().item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    from kvcompress.corpus import KINDS, parse_kinds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of kinds of text")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of each selection part")
    parser.add_argument("--out", default="runs/kinds_codec_errors.json", help="JSON results (resumed per kind)")
    args = parser.parse_args(argv)
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        print(f"kinds_codec_errors: {err}", file=sys.stderr)
        return 2

    import kvcompress.cache.build as build
    from kvcompress import load_model
    from kvcompress.calibration import artifact_for
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.reconstruction import capture_states, reconstruct
    from kvcompress.presets import load_spec

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    bits4 = load_spec("bits4")
    artifact = artifact_for(model, bits4)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    layer_codec = build.pca_codebook
    for kind in kinds:
        if kind in results:
            continue
        capture = capture_states(model, corpus_tokens(tokenizer, "selection", args.tokens, kind=kind))
        results[kind] = {}
        for label, spec, codec in (("int4", load_spec("int4"), None), ("bits4", bits4, layer_codec),
                                   ("bits4-per-head", bits4, per_head_pca)):
            build.pca_codebook = codec or layer_codec
            try:
                pairs, memory = reconstruct(model, spec, capture, artifact=artifact if codec else None)
            finally:
                build.pca_codebook = layer_codec
            results[kind][label] = {"stored_bytes": memory["stored_bytes"], "layers": attention_errors(capture, pairs)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results))
    for kind, r in results.items():
        def rms(label, tensor):
            xs = [x[tensor + "_layer"] for x in r[label]["layers"]]
            return (sum(x * x for x in xs) / len(xs)) ** 0.5

        stored = ", ".join(f"{label} {entry['stored_bytes']:,}" for label, entry in r.items())
        print(f"{kind}: K int4 {rms('int4', 'K'):.4f}, bits4 {rms('bits4', 'K'):.4f}, per head "
              f"{rms('bits4-per-head', 'K'):.4f}; V int4 {rms('int4', 'V'):.4f}, bits4 {rms('bits4', 'V'):.4f}; "
              f"stored bytes {stored}")
        ratios = [(x["K_layer"] / a["K_layer"], y["K_layer"] / a["K_layer"])
                  for a, x, y in zip(r["int4"]["layers"], r["bits4"]["layers"], r["bits4-per-head"]["layers"])]
        print("  K error / int4's per layer (bits4 -> per head): "
              + " ".join(f"L{i}:{b:.2f}->{p:.2f}" for i, (b, p) in enumerate(ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
