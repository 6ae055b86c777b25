"""Would AdaKV-style per-head budgets pay? Eviction alone, uniform vs per-head, on selection text.

Under the prompt protocol (fp32, `--context` tokens prefilled at once, `--tokens` teacher-forced in
chunks of 32; `kvcompress.measure.prompt`), each layer scores its prompt with a policy and keeps
either `n_kept` tokens in every KV head (`choose_kept`, what the cache does) or the same total
shared among its heads (`per_head_kept`). This script does not build a compressed cache: the
model keeps the whole prompt in a `DynamicCache` and an attention function masks, per KV head,
the tokens that head dropped (an emulation of ragged storage, whose bytes would be the tokens
kept). It reports KL against the uncompressed model for both allocations, and what a padded
layout (every head stored at the largest count of its layer) would store relative to the
ragged one. The uniform row is checked against the cache itself (`prompt_eval` of the same
`none@POLICY:KEEP` spec: the same KL to rounding), which shows the emulation drops what the
cache drops.

    OMP_NUM_THREADS=1 python benchmarks/per_head_budgets.py --kinds docs,code,plays \\
        --policies snapkv,expected --keep 0.2,0.4 --threads 1 --out runs/per_head.json

It reads the selection parts only (what chooses presets), never the report parts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from kvcompress.cache.eviction import PER_HEAD_POLICIES, SCORERS, choose_kept, kept_count, per_head_kept
from kvcompress.compat import register_attention_function, sdpa_attention
from kvcompress.corpus import corpus_slice, parse_kinds
from kvcompress.io import parse_list, write_json_atomic
from kvcompress.measure.evaluate import TokenScores
from kvcompress.measure.prompt import continuation_bounds, prompt_eval
from kvcompress.models import load_model
from kvcompress.presets import load_spec
from kvcompress.spec import EvictionSpec

NAME = "kvcompress-per-head-emulation"
logger = logging.getLogger("per_head_budgets")


class Emulation:
    """What the attention function does: at the prompt, score it and remember per layer the
    (B, H_kv, n) tokens each KV head keeps; afterwards, mask the dropped ones per head."""

    def __init__(self, spec: EvictionSpec | None, allocation: str, sinks: int, window: int, floor: float):
        self.spec, self.allocation, self.sinks, self.window, self.floor = spec, allocation, sinks, window, floor
        self.kept: dict[int, torch.Tensor] = {}

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        layer, n = module.layer_idx, key.shape[2]
        if self.spec is not None and layer not in self.kept:  # the prompt: keys are its n tokens
            self.kept[layer] = self.keep(query, key, value, scaling)
        if self.spec is not None and query.shape[2] < n:  # a continuation chunk: drop per head
            kept = self.kept[layer]  # (B, H_kv, n_ctx)
            B, H, n_ctx = kept.shape
            rep = query.shape[1] // H
            allowed = torch.ones(B, H, n, dtype=torch.bool, device=key.device)
            allowed[:, :, :n_ctx] = kept
            allowed = allowed.repeat_interleave(rep, dim=1)[:, :, None, :]  # (B, H_q, 1, n)
            if attention_mask is None:  # causal within the chunk, all of the cache before it
                Q = query.shape[2]
                mask = allowed & (torch.arange(n, device=key.device) <= torch.arange(n - Q, n, device=key.device)[:, None])
            elif attention_mask.dtype == torch.bool:
                mask = attention_mask[:, :, :, :n] & allowed
            else:
                mask = attention_mask[:, :, :, :n].masked_fill(~allowed, float("-inf"))
            attention_mask = mask
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    def keep(self, query, key, value, scaling) -> torch.Tensor:
        B, H, n, _ = key.shape
        if self.allocation == "uniform":
            index = choose_kept(self.spec, query, key, value, scaling, sinks=self.sinks, protected=self.window,
                                block_size=32)
            return torch.zeros(B, H, n, dtype=torch.bool, device=key.device).scatter_(2, index, True)
        always = torch.zeros(n, dtype=torch.bool, device=key.device)
        always[:self.sinks] = True
        always[max(n - self.window, 0):] = True
        scores = torch.nan_to_num(SCORERS[self.spec.policy](query, key, value, scaling, self.spec).float(), nan=0.0)
        return per_head_kept(scores, kept_count(self.spec, n, self.sinks, self.window, 32), always, self.floor)


@torch.no_grad()
def run(model, ids: torch.Tensor, context: int, emulation: Emulation) -> list[torch.Tensor]:
    """Logits of every continuation chunk with the emulation's eviction (spec None: none)."""
    from transformers import DynamicCache

    register_attention_function(NAME, emulation.attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits[0].float()
                for a, b in continuation_bounds(context, ids.shape[1] - context - 1)]
    finally:
        model.set_attn_implementation(previous)


def padding_overhead(kept: dict[int, torch.Tensor]) -> float:
    """Bytes of a padded layout (each layer's heads at its largest count) / bytes of the ragged one."""
    padded = sum(k.sum(-1).max(-1).values.sum().item() * k.shape[1] for k in kept.values())
    ragged = sum(k.sum().item() for k in kept.values())
    return padded / ragged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="docs,code,plays", help="comma list of kinds of text (selection parts)")
    parser.add_argument("--policies", default="snapkv,expected", help=f"comma list among {PER_HEAD_POLICIES}")
    parser.add_argument("--keep", default="0.2,0.4", help="comma list of fractions of the prompt kept (average)")
    parser.add_argument("--floor", type=float, default=0.2, help="share of the scored budget each head keeps itself")
    parser.add_argument("--window", type=int, default=128, help="last prompt tokens always kept")
    parser.add_argument("--sinks", type=int, default=4, help="first prompt tokens always kept")
    parser.add_argument("--context", type=int, default=1536, help="tokens prefilled at once")
    parser.add_argument("--tokens", type=int, default=512, help="continuation tokens scored")
    parser.add_argument("--check", default="docs", help="kind on which the uniform rows are checked against the "
                                                         "cache's own prompt_eval ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default="runs/per_head.json", help="JSON record")
    args = parser.parse_args(argv)
    policies = parse_list(args.policies)
    try:
        keeps = [float(k) for k in parse_list(args.keep)]
    except ValueError:
        keeps = []
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        print(f"per_head_budgets: {err}", file=sys.stderr)
        return 2
    bad = sorted(set(policies) - set(PER_HEAD_POLICIES))
    if bad or not policies:
        print(f"per_head_budgets: --policies {args.policies}: unknown {bad}; allowed: "
              f"{', '.join(PER_HEAD_POLICIES)}", file=sys.stderr)
        return 2
    if not keeps or not all(0 < k < 1 for k in keeps):
        print(f"per_head_budgets: --keep {args.keep}: give fractions in (0, 1), e.g. 0.2,0.4", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    started, rows = time.perf_counter(), []
    for kind in kinds:
        text = corpus_slice(tokenizer, "selection", n_tokens=args.context + args.tokens + 1, kind=kind)
        ids = text.ids
        base = run(model, ids, args.context, Emulation(None, "uniform", args.sinks, args.window, args.floor))
        targets = [ids[0, a + 1:b + 1] for a, b in continuation_bounds(args.context, args.tokens)]
        for policy in policies:
            for keep in keeps:
                spec = EvictionSpec(policy=policy, keep=keep)
                for allocation in ("uniform", "per-head"):
                    emulation = Emulation(spec, allocation, args.sinks, args.window, args.floor)
                    logits = run(model, ids, args.context, emulation)
                    scores = TokenScores()
                    for b, c, t in zip(base, logits, targets):
                        scores.add(b, c, t)
                    figures = scores.figures()
                    kept = sum(k.sum().item() for k in emulation.kept.values())
                    total = sum(k.numel() for k in emulation.kept.values())
                    row = {"kind": kind, "policy": policy, "keep": keep, "allocation": allocation,
                           "kl": figures["kl"], "kl_ci95": figures["kl_ci95"] and list(figures["kl_ci95"]),
                           "ppl_change": figures["ppl_change"], "top1": figures["top1"],
                           "kept_fraction": kept / total, "padding_overhead": padding_overhead(emulation.kept)}
                    if allocation == "uniform" and kind == args.check:
                        cache = prompt_eval(model, ids, load_spec(f"none@{policy}:{keep:g}"), args.context,
                                            progress=False)
                        row["cache_kl"] = cache.kl
                    rows.append(row)
                    logger.info(f"[{time.perf_counter() - started:5.0f} s] {kind} {policy} keep {keep:g} {allocation}: "
                                f"KL {figures['kl']:.4f} (kept {kept / total:.3f}, padded/ragged "
                                f"{row['padding_overhead']:.2f})" + (f", cache's own KL {row['cache_kl']:.4f}"
                                                                     if "cache_kl" in row else ""))
    command = "python benchmarks/per_head_budgets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json_atomic(args.out, {"command": command, "part": "selection", "context": args.context,
                                 "tokens": args.tokens, "window": args.window, "sinks": args.sinks,
                                 "floor": args.floor, "rows": rows})
    print("| kind | policy | keep | KL uniform | KL per-head | per-head / uniform | padded / ragged bytes |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["kind"], r["policy"], r["keep"], r["allocation"]): r for r in rows}
    for kind in kinds:
        for policy in policies:
            for keep in keeps:
                u, p = by[kind, policy, keep, "uniform"], by[kind, policy, keep, "per-head"]
                print(f"| {kind} | {policy} | {keep:g} | {u['kl']:.4f} | {p['kl']:.4f} | {p['kl'] / u['kl']:.2f}x | "
                      f"{p['padding_overhead']:.2f}x |")
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
