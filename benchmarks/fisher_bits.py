"""Per-layer K and V bits for a bitsN budget, by diagonal-Fisher-weighted coding error (KVQuant-style).

On calibration text of every kind (tokens from --offset of each kind's calibration part, which the
calibration artifact does not read), one forward and backward pass of the model's loss per
sequence gives the gradient g of every pre-RoPE key and every value; each layer's K and V are then
coded at every candidate width (pca+codebook keys pre-RoPE, rotated+codebook values) and the
expected loss change of the coding error e is taken as sum g^2 e^2 (diagonal empirical Fisher).
A greedy allocation spends N x 2 x layers bits (0.5 at a time, on the largest drop per bit) and
the spec is written with one override per layer: bits per value = N + 16/head_dim as for bitsN.

    nice -n 10 python benchmarks/fisher_bits.py --bits 4 --out runs/fisher-bits4.json

It reads no selection or report part; which spec ships is chosen on the selection parts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def gradients(model, ids: torch.Tensor):
    """Per layer: (pre-RoPE keys, key grads, values, value grads), each (1, H, T, D) float32."""
    from kvcompress.measure.reconstruction import attention_modules

    cfg = model.config
    heads, dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kept: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for attn in attention_modules(model):
        for name in ("k_proj", "v_proj"):
            def hook(_m, _a, out, key=(attn.layer_idx, name)):
                leaf = out.detach().requires_grad_(True)
                kept[key] = leaf
                return leaf
            handles.append(getattr(attn, name).register_forward_hook(hook))
    try:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()

    def shape(t):  # (1, T, H*D) -> (1, H, T, D)
        return t.reshape(t.shape[0], t.shape[1], heads, dim).transpose(1, 2).float()

    layers = sorted({i for i, _ in kept})
    return [(shape(kept[i, "k_proj"].detach()), shape(kept[i, "k_proj"].grad), shape(kept[i, "v_proj"].detach()),
             shape(kept[i, "v_proj"].grad)) for i in layers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, required=True, help="N of bitsN: average code bits per value")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per kind (sequences of 1024)")
    parser.add_argument("--offset", type=int, default=8192, help="first token within each calibration part")
    parser.add_argument("--weight", default="none", choices=["none", "query"], help="key allocation weight")
    parser.add_argument("--lo", type=float, default=1.5, help="widths from N - lo")
    parser.add_argument("--hi", type=float, default=2.0, help="widths up to N + hi")
    parser.add_argument("--out", required=True, help="spec file (JSON) to write")
    args = parser.parse_args(argv)

    from kvcompress import load_model
    from kvcompress.cache.build import build_codec
    from kvcompress.calibration import embedded_artifact
    from kvcompress.corpus import KINDS, corpus_tokens
    from kvcompress.spec import CacheSpec, TensorSpec

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    artifact = embedded_artifact(model)
    n = args.bits
    grid = [b / 2 for b in range(int(2 * max(1.0, n - args.lo)), int(2 * min(6.0, n + args.hi)) + 1)]
    num_layers, dim = model.config.num_hidden_layers, model.config.head_dim
    cost = {(layer, part): {b: 0.0 for b in grid} for layer in range(num_layers) for part in ("key", "value")}
    codecs = {}
    for layer in range(num_layers):
        for b in grid:
            codecs[layer, "key", b] = build_codec(
                TensorSpec(method="pca+codebook", bits=b, key_space="pre_rope", weight=args.weight),
                layer_idx=layer, kind="key_pre", artifact=artifact, head_dim=dim)
            codecs[layer, "value", b] = build_codec(TensorSpec(method="rotated+codebook", bits=b),
                                                    layer_idx=layer, kind="value", artifact=artifact, head_dim=dim)
    for kind in KINDS:
        ids = corpus_tokens(tokenizer, "calibration", args.tokens, offset=args.offset, kind=kind)
        for start in range(0, ids.shape[1], 1024):
            per_layer = gradients(model, ids[:, start:start + 1024])
            for layer, (k, gk, v, gv) in enumerate(per_layer):
                for b in grid:
                    for part, x, g in (("key", k, gk), ("value", v, gv)):
                        codec = codecs[layer, part, b]
                        with torch.no_grad():
                            e = codec.decode(codec.encode(x), torch.float32) - x
                        cost[layer, part][b] += (g.square() * e.square()).sum().item()
            print(f"{kind} tokens {start}..{start + 1024}: done", file=sys.stderr, flush=True)
    widths = {key: grid[0] for key in cost}
    budget = 2 * num_layers * n - sum(widths.values())
    while budget >= 0.5 - 1e-9:
        best, gain = None, -1.0
        for key, b in widths.items():
            nxt = b + 0.5
            if nxt in cost[key]:
                g = cost[key][b] - cost[key][nxt]
                if g > gain:
                    best, gain = key, g
        if best is None:
            break
        widths[best] += 0.5
        budget -= 0.5
    layers = {}
    for layer in range(num_layers):
        kb, vb = widths[layer, "key"], widths[layer, "value"]
        layers[str(layer)] = {"key": {"bits": kb}, "value": {"bits": vb}}
    spec = CacheSpec.from_dict({"name": f"fisher-bits{n:g}",
                                "key": {"method": "pca+codebook", "bits": n, "key_space": "pre_rope",
                                        "weight": args.weight},
                                "value": {"method": "rotated+codebook", "bits": n}, "layers": layers})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(spec.to_dict(), indent=1))
    Path(args.out).with_suffix(".cost.json").write_text(json.dumps(
        {f"{layer}.{part}": {str(b): c for b, c in costs.items()} for (layer, part), costs in cost.items()}))
    print(" ".join(f"L{layer}:K{widths[layer, 'key']:g}/V{widths[layer, 'value']:g}" for layer in range(num_layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
