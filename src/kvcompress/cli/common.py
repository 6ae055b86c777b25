"""Arguments and helpers shared by several sub-commands (model, corpus, dtype, output)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..io import write_json_atomic
from ..models import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id, local transformers folder or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None,
                        help="UTF-8 text file: split like the embedded corpus (calibration 0-30%%, selection "
                             "30-40%%, report 40-100%% of its characters) and its report part read (default: the "
                             "report part of the embedded corpus, CPython's pydoc topics)")


def load_model_from_args(args):
    from ..models import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, creating parent folders; returns the path."""
    return write_json_atomic(path, data)
