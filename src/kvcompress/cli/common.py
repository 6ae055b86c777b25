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
                        help="UTF-8 text file to evaluate on (default: the held-out part of the embedded "
                             "corpus, CPython's pydoc topics)")


def load_model_from_args(args):
    from ..models import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, creating parent folders; returns the path."""
    return write_json_atomic(path, data)


def add_ray_arguments(parser: argparse.ArgumentParser, unit: str = "spec") -> None:
    """`--ray [ADDRESS]` and the per-worker resources (see `kvcompress.distributed.RayOptions`)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help=f"run on a Ray cluster, one {unit} per unit of work on actors that keep the model "
                             "loaded: alone, start a local cluster; 'auto' or an address, join one "
                             "(needs kvcompress[ray])")
    parser.add_argument("--ray-workers", type=int, default=2, help="Ray actors, each with its own model copy")
    parser.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs each Ray actor reserves")
    parser.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs each Ray actor reserves")
    parser.add_argument("--ray-num-cpus", type=int, default=None,
                        help="CPUs of the local cluster started by a bare --ray (None: all of the machine's)")
    parser.add_argument("--ray-retries", type=int, default=1,
                        help=f"times a {unit} whose Ray worker died is tried again on a fresh worker")


def ray_options_from_args(args: argparse.Namespace):
    """RayOptions from the flags of `add_ray_arguments`, or None without --ray.

    Imports Ray at once, so a missing extra is reported before any work starts.
    """
    if args.ray is None:
        return None
    from ..distributed import RayOptions, import_ray

    import_ray()
    return RayOptions(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                      cpus_per_worker=args.ray_cpus_per_worker, gpus_per_worker=args.ray_gpus_per_worker,
                      num_cpus=args.ray_num_cpus, retries=args.ray_retries)
