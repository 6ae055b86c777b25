"""KL sensitivity of each layer's K and V to their code width, on the selection parts (issue 24 item 2).

One float32 forward pass over the first `--tokens` tokens of the **selection** part of every kind
(one sequence per kind, in one batch), keeping each decoder layer's input; then, for each layer i,
tensor (K or V) and width b, only that tensor of layer i is coded by bitsN's codec at width b (keys
pre-RoPE at k_proj's output, values at v_proj's output; every token after the first 8) and the model
is run again from layer i: the mean KL of the next-token distribution against the exact pass, over
all kinds' positions after the first 8. Without `--window`, every earlier token is coded; with
`--window W`, a query reads the coded K or V only of tokens at least W older than itself (as the
cache keeps its most recent tokens exact; attention of every layer computed here in float32), so a
layer whose attention stays within the window costs less. Either way the figures rank layers and
widths; they are not `eval`'s KL. Resumable (one entry "LAYER/key|value/BITS" per measurement in
--out, written after each layer; `--layers 9-29` measures some).

    nice -n 10 python benchmarks/layer_bits_sensitivity.py --tokens 256 --out runs/layer_sensitivity.json

Reads only selection parts; chooses nothing by itself (KL on the selection parts chooses:
`select_kinds_codecs.py --extra LABEL=SPEC`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor, start: int) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)[:, start:].mean().item()


def windowed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, coded_key: torch.Tensor,
                       coded_value: torch.Tensor, window: int, scaling: float) -> torch.Tensor:
    """Causal attention where query t reads token s coded when t - s >= window, exact otherwise.

    query (B, Hq, T, D); key, value and their coded forms (B, H, T, D), H dividing Hq (grouped
    queries); returns (B, T, Hq, D), as transformers' attention functions do.
    """
    groups = query.shape[1] // key.shape[1]
    key, value, coded_key, coded_value = (x.repeat_interleave(groups, 1) for x in (key, value, coded_key, coded_value))
    T = query.shape[2]
    age = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T): query t, token s
    far = (age >= window).to(query.device)
    scores = torch.where(far, query @ coded_key.transpose(-1, -2), query @ key.transpose(-1, -2)) * scaling
    p = torch.softmax(scores.float().masked_fill((age < 0).to(query.device), float("-inf")), -1).to(query.dtype)
    out = (p * ~far) @ value + (p * far) @ coded_value  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="bits2", help="the spec whose codecs are measured, at the widths of its "
                        "base (its per-layer overrides ignored; bits2: K 2, V 2.25)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of each kind's selection part")
    parser.add_argument("--kinds", default="docs,code,plays")
    parser.add_argument("--deltas", default="-0.5,0,0.5,1", help="widths tried: base width + each delta")
    parser.add_argument("--out", default="runs/layer_sensitivity.json")
    parser.add_argument("--layers", default="", help="layers to measure, e.g. 0-8 (default: all)")
    parser.add_argument("--window", type=int, default=0, help="tokens each query reads exact (the newest); "
                        "0: every token after the first 8 coded (the measure of before)")
    args = parser.parse_args(argv)
    try:  # every option checked before the model loads: a wrong value is one line, exit 2
        from kvcompress.corpus import parse_kinds
        from kvcompress.presets import load_spec

        load_spec(args.spec)
        try:
            deltas = [float(d) for d in args.deltas.split(",")]
        except ValueError:
            raise ValueError(f"--deltas {args.deltas}: give a comma list of numbers") from None
        lo, _, hi = args.layers.partition("-")
        try:
            first, last = (int(lo), int(hi or lo)) if args.layers else (0, None)
        except ValueError:
            raise ValueError(f"--layers {args.layers}: give a layer or a range FIRST-LAST") from None
        if args.tokens < 1 or first < 0 or (last is not None and last < first) or args.window < 0:
            raise ValueError("--tokens must be at least 1, --window at least 0 and --layers a range FIRST-LAST "
                             "of layer indices")
        kinds = parse_kinds(args.kinds)
        out_path = Path(args.out)
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        if results and results.get("window", 0) != args.window:  # one file, one measure: no mixed windows
            raise ValueError(f"--out {args.out} holds figures at --window {results.get('window', 0)}, not "
                             f"{args.window}: give another --out")
    except Exception as err:  # noqa: BLE001 (load_spec's own errors name the spec)
        print(f"layer_bits_sensitivity: {err} (e.g. --spec bits2 --layers 0-8 --deltas -0.5,0,0.5,1)",
              file=sys.stderr)
        return 2

    from kvcompress import load_model
    from kvcompress.cache.build import build_codec
    from kvcompress.calibration import embedded_artifact
    from kvcompress.corpus import corpus_tokens

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    artifact = embedded_artifact(model)
    base = load_spec(args.spec).to_dict()
    spec = load_spec({**base, "layers": {}, "layers_at_depth": {}})
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.cat([corpus_tokens(tokenizer, "selection", args.tokens, kind=k).reshape(1, -1)
                     for k in kinds])  # (kinds, T)
    layers = model.model.layers
    inputs: dict[int, tuple] = {}

    def keep(idx):
        def hook(_module, a, kw):
            inputs[idx] = (a, kw)
        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    ref_logp = torch.log_softmax(ref.float(), -1)
    start = 8

    def run_from(i: int) -> torch.Tensor:
        a, kw = inputs[i]
        h = a[0]
        for j in range(i, L):
            _, kwj = inputs[j]
            h = layers[j](h, *a[1:], **kwj)
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(model.model.norm(h))

    def coder(codec):
        def hook(_module, _args, out):  # (B, T, H*D) -> coded after token `start`
            B, T, _ = out.shape
            x = out.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            tail = x[:, :, start:]
            dec = codec.decode(codec.encode(tail), torch.float32)
            x = torch.cat([x[:, :, :start], dec], dim=2)
            return x.transpose(1, 2).reshape(B, T, H * D)
        return hook

    target: dict = {}  # with --window: the layer, tensor and codec being measured
    if args.window:
        from kvcompress.compat import register_attention_function
        from kvcompress.rope import RopeInverter, find_rotary_emb

        rope = RopeInverter(rotary_emb=find_rotary_emb(model))

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            coded_key, coded_value = key, value  # (B, H, T, D) post-RoPE keys, values
            if target.get("layer") == module.layer_idx:
                codec = target["codec"]
                if target["name"] == "key":  # code the pre-RoPE key, as bits2 does, then rotate it back
                    pre = rope.unrotate(key.float(), 0)
                    tail = codec.decode(codec.encode(pre[:, :, start:]), torch.float32)
                    coded_key = rope.rotate(torch.cat([pre[:, :, :start], tail], 2), 0).to(key.dtype)
                else:
                    tail = codec.decode(codec.encode(value[:, :, start:].float()), torch.float32)
                    coded_value = torch.cat([value[:, :, :start], tail.to(value.dtype)], 2)
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return windowed_attention(query, key, value, coded_key, coded_value, args.window, scale), None

        register_attention_function("kvcompress_window_sensitivity", attention)
        model.set_attn_implementation("kvcompress_window_sensitivity")
        with torch.no_grad():  # the exact pass through this attention: differences come from the codes only
            ref_logp = torch.log_softmax(run_from(0).float(), -1)

    results["window"] = args.window
    t0 = time.perf_counter()
    chosen = range(first, L if last is None else last + 1)
    for i in chosen:
        k_spec, v_spec = spec.for_layer(i)
        for name, tspec, proj, kind in (("key", k_spec, "k_proj", "key_pre"), ("value", v_spec, "v_proj", "value")):
            for d in deltas:
                bits = tspec.bits + d
                key = f"{i}/{name}/{bits:g}"
                if key in results:
                    continue
                codec = build_codec(dataclasses.replace(tspec, bits=bits), layer_idx=i, kind=kind,
                                    artifact=artifact, head_dim=D)
                if args.window:
                    target.update(layer=i, name=name, codec=codec)
                    handle = None
                else:
                    handle = getattr(layers[i].self_attn, proj).register_forward_hook(coder(codec))
                try:
                    with torch.no_grad():
                        results[key] = _kl(ref_logp, run_from(i), start)
                finally:
                    target.clear()
                    if handle is not None:
                        handle.remove()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=0))
        print(f"layer {i}: " + " ".join(f"{k.split('/', 1)[1]}={v:.5f}" for k, v in results.items()
                                         if k.startswith(f"{i}/")) + f" ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
