"""`kvcompress calibrate`: compute a model's K/V bases and channel statistics (see `calibration`)."""

from __future__ import annotations

import argparse

from ..calibration import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, calibrate
from .common import (UserError, add_model_arguments, check_corpus, check_model_args, check_output_dir,
                     check_tokens, load_model_from_args)

NAME = "calibrate"
HELP = "calibrate per-layer, per-head K/V bases (for low-rank specs) and write an artifact folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="artifact folder to write (created if missing)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="tokens per forward; post-RoPE statistics cover positions 0..seq-len-1")
    parser.add_argument("--corpus", default=None,
                        help="UTF-8 text file to calibrate on (default: the calibration part of the embedded "
                             "corpus, disjoint from the evaluation part)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..corpus import CorpusError, corpus_tokens

    check_output_dir(args.out, "--out")
    check_tokens(args.tokens, "--tokens", 16)
    check_tokens(args.seq_len, "--seq-len", 16)
    check_corpus(args.corpus)
    check_model_args(args)
    model, tokenizer = load_model_from_args(args)
    try:
        ids = corpus_tokens(tokenizer, part="calibration", n_tokens=args.tokens, path=args.corpus)
    except CorpusError as err:
        raise UserError(f"--tokens {args.tokens}: {err}") from None
    artifact = calibrate(model, ids, seq_len=args.seq_len, corpus=args.corpus or "embedded:calibration",
                         progress=not args.no_progress)
    folder = artifact.save(args.out)
    meta = artifact.metadata
    print(f"model       {meta['model']} (fingerprint {meta['fingerprint']})")
    print(f"tokens      {meta['tokens']} in {meta['sequences']} sequence(s) of up to {meta['seq_len']}")
    if meta["pre_rope_unavailable"]:
        print(f"pre-RoPE    unavailable: {meta['pre_rope_unavailable']}")
    for kind in artifact.kinds:
        spectrum = artifact.tensors[f"{kind}.spectrum"]  # (L, H, D)
        dim = spectrum.shape[-1]
        kept = {r: (spectrum[..., :r].sum(-1) / spectrum.sum(-1).clamp_min(1e-30)).mean().item()
                for r in (dim // 4, dim // 2, 3 * dim // 4)}
        print(f"{kind:11s} energy kept (mean over layers and heads): "
              + ", ".join(f"rank {r}: {v:.3f}" for r, v in kept.items()))
    print(f"wrote       {folder}")
    return 0
