"""Arguments, checks and helpers shared by the sub-commands (model, corpus, device, outputs).

Every command checks what it can before it loads a model (`check_*` below): input files exist
and are readable, output paths can be written, token counts are in range, the device exists and
the spec resolves. A failed check raises `UserError`, whose message names the option or file,
what is wrong and what to do; `kvcompress.cli.main` prints it as one line (exit status 2).

This module does not load models or measure anything; it only reads arguments and the files
they name.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from ..models import DTYPES


class UserError(ValueError):
    """A command-line argument or a file it names is wrong; the message says which and what to do."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id, local transformers folder or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device: cpu, cuda, cuda:N or mps")


def add_corpus_arguments(parser: argparse.ArgumentParser, selection: bool = False, each: bool = False) -> None:
    """`--text KIND` (a kind of text kvcompress ships; see `corpus.KINDS`) or `--corpus FILE` (your
    own text), never both. Report commands read the report part; with `selection`, the command
    reads the calibration and selection parts and `--text all` joins equal shares of every kind;
    with `each`, `--text all` measures every kind in turn."""
    from ..corpus import ALL_KINDS, DEFAULT_KIND, KINDS

    kinds = KINDS + ((ALL_KINDS,) if selection or each else ())
    parts = "calibration and selection parts" if selection else "report part"
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text", default=None, choices=kinds, metavar="KIND",
                       help=f"kind of text whose {parts} are read: {', '.join(kinds)} (default {DEFAULT_KIND}: "
                            "CPython's pydoc topics; code: Python standard-library modules; plays: Shakespeare, "
                            "extra texts" + ("; all: equal token shares of every kind" if selection else "")
                            + ("; all: every kind in turn, OUT/KIND each, and a report across them" if each else "")
                            + ")")
    group.add_argument("--corpus", default=None, metavar="FILE",
                       help=f"instead of --text, a UTF-8 text file split like the shipped texts (calibration 0-30%%, "
                            f"selection 30-40%%, report 40-100%% of its characters); its {parts} are read")


def text_kind(args: argparse.Namespace) -> str | None:
    """The kind of text `add_corpus_arguments` asked for: None with --corpus FILE, else the kind
    (default docs)."""
    from ..corpus import DEFAULT_KIND

    return None if args.corpus is not None else (args.text or DEFAULT_KIND)


def text_label(args: argparse.Namespace) -> str:
    """How messages name the text: the file, or the kind."""
    from ..corpus import DEFAULT_KIND

    if args.corpus is not None:
        return str(args.corpus)
    kind = args.text or DEFAULT_KIND
    return "the embedded corpus" if kind == DEFAULT_KIND else f"text {kind!r}"


def load_model_from_args(args):
    from ..models import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


# --------------------------------------------------------------------------- checks before any work


def check_tokens(value: int, option: str, minimum: int, why: str = "") -> None:
    """`value` must be an integer >= `minimum`."""
    if value < minimum:
        raise UserError(f"{option} {value} is too small: at least {minimum} needed{why}; pass {option} {minimum} "
                        "or more")


def check_positive(value: float | int | None, option: str, example: str = "") -> None:
    """`value` (if given) must be a finite number above 0 (`example`: a valid value for the message)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        fix = f"; pass e.g. {option} {example}" if example else ""
        raise UserError(f"{option} must be a positive, finite number, got {value}{fix}")


def check_device(device: str) -> None:
    """The device must parse, be a real device (not "meta") and be available in this torch."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "meta":
        raise UserError("--device meta holds no data, so nothing can be computed on it; use cpu, cuda or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {device}: {why}; use --device cpu (or install a CUDA build of torch on a "
                            "machine with a GPU)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible; use "
                            f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise UserError(f"--device {device}: no {parsed.type} device is available; use --device cpu")


def check_input_file(path: str | None, option: str, what: str = "file") -> None:
    """`path` (if given) must be an existing, readable file."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{option} {path}: no such {what}; check the path")
    if p.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a {what}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{option} {path}: permission denied; make the {what} readable")


def check_corpus(path: str | None, option: str = "--corpus") -> None:
    """A --corpus file must be readable UTF-8 text with some words in it (token counts are checked
    once the tokenizer is loaded)."""
    if path is None:
        return
    from ..corpus import CorpusError, load_text

    check_input_file(path, option, "UTF-8 text file")
    try:
        load_text(path)
    except CorpusError as err:
        raise UserError(f"{option} {path}: {err}") from None


def check_text(args: argparse.Namespace) -> None:
    """The text of `add_corpus_arguments` can be read: a --corpus file (see `check_corpus`), or the
    kind's text (`--text plays` needs its package; MissingExtraError names the extra)."""
    from ..corpus import ALL_KINDS, KINDS, CorpusError, kind_text

    kind = text_kind(args)
    if kind is None:
        check_corpus(args.corpus)
        return
    for name in KINDS if kind == ALL_KINDS else (kind,):
        try:
            kind_text(name)
        except CorpusError as err:
            raise UserError(f"--text {kind}: {err}") from None


def check_text_protocol(args: argparse.Namespace) -> None:
    """`--text all` joins stretches of every kind into one text, which the prompt protocol would read
    as one context followed by a continuation of the last kind only: refused with --context."""
    from ..corpus import ALL_KINDS, KINDS

    if getattr(args, "text", None) == ALL_KINDS and getattr(args, "context", None) is not None:
        raise UserError(f"--text {ALL_KINDS} with --context: the prompt protocol reads one contiguous text, so every "
                        f"continuation token would be of the last kind; pass one kind ({', '.join(KINDS)})")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, option: str, given: str) -> None:
    """The nearest existing folder above `path` must be a writable folder."""
    ancestor = _nearest_existing(path.parent if path.parent != path else path)
    if not ancestor.is_dir():
        raise UserError(f"{option} {given}: {ancestor} is a file, so no folder can be created there; choose "
                        "another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {given}: cannot write in {ancestor} (permission denied); choose another path")


def check_output_file(path: str | None, option: str, suffixes: tuple[str, ...] = ()) -> None:
    """`path` (if given) must name a file that can be created or replaced (not a folder)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        example = Path(path) / ("result" + (suffixes[0] if suffixes else ".json"))
        raise UserError(f"{option} {path} is a folder; pass a file name (e.g. {example})")
    if suffixes and p.suffix not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{option} {path}: the file is not writable (permission denied); choose another path")
    _check_creatable(p, option, path)


def check_output_dir(path: str | None, option: str) -> None:
    """`path` (if given) must be a folder, or a path where one can be created (not a file)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file; pass a folder path (it is created if missing)")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{option} {path}: the folder is not writable (permission denied); choose another path")
        return
    _check_creatable(p, option, path)


def check_model_path(name: str | None, option: str = "--model") -> None:
    """A --model that is a local path must be a .gguf file or a folder with a readable config.json."""
    if name is None:
        return
    import json

    from ..models import _looks_like_path

    p = Path(name).expanduser()
    if p.is_dir():
        config = p / "config.json"
        if not config.is_file():
            raise UserError(f"{option} {name} is a folder without config.json, so not a transformers model; pass a "
                            "folder written by save_pretrained, a .gguf file, or leave --model out for the embedded "
                            "model")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            detail = " ".join(str(err).split())
            raise UserError(f"{option} {name}: {config} is not valid JSON ({detail}); restore it, e.g. with "
                            "save_pretrained") from None
    elif p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{option} {name} is a file but not a .gguf file; pass a .gguf file, a transformers "
                            "folder, a hub id, or leave --model out for the embedded model")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(f"{option} {name} is not a GGUF file (it does not start with the GGUF magic bytes); "
                            "pass a real .gguf file")
    elif _looks_like_path(str(name)):
        raise UserError(f"{option} {name}: no such model file or folder; check the path, or pass a hub id")


def check_spec(text: str, option: str = "--spec"):
    """The resolved spec of `text` (preset name or spec file); UserError naming `option` otherwise."""
    from ..extras import MissingExtraError
    from ..presets import load_spec

    try:
        return load_spec(text)
    except MissingExtraError:
        raise
    except (ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise UserError(f"{option} {text}: {message}") from None


def check_model_args(args: argparse.Namespace) -> None:
    """--model and --device (every command that loads a model)."""
    check_device(str(args.device))
    check_model_path(args.model)


def check_model_context(model, n_tokens: int, option: str, why: str, value: int) -> None:
    """`n_tokens` positions must fit the loaded model's context (`max_position_embeddings`); else a
    UserError naming `option` (whose value `value` is what to lower) and the largest that fits."""
    from ..fingerprint import text_config

    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        fits = value - (n_tokens - limit)
        fix = f"pass {option.split()[0]} {fits} or less" if fits >= 1 else "use fewer tokens"
        raise UserError(f"{option}: {why}, {n_tokens} tokens, more than the model's context of {limit}; {fix}")


def check_artifact_dir(path: str | None, option: str = "--artifact") -> None:
    """An --artifact must be an existing folder (its contents are checked when it is loaded)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file; pass the folder that `kvcompress calibrate --out DIR` wrote")
    if not p.exists():
        raise UserError(f"{option} {path}: no such folder; create it with `kvcompress calibrate --out {path}` "
                        "(same --model)")


def check_eval_tokens(spec, n_tokens: int, option: str = "--tokens", label: str | None = None) -> None:
    """`n_tokens` of decode-faithful evaluation must let a lossy `spec` compress something that a
    later token reads (see `measure.evaluate.min_eval_tokens`)."""
    from ..measure.evaluate import is_lossy, min_eval_tokens

    if not is_lossy(spec):
        check_tokens(n_tokens, option, 2)
        return
    need = min_eval_tokens(spec)
    if n_tokens < need:
        name = label or spec.name or "the spec"
        raise UserError(f"{option} {n_tokens} is too few for {name}: it keeps sinks {spec.sinks} + window "
                        f"{spec.window} tokens in full precision and compresses {spec.block_size} at a time, so "
                        f"nothing would be compressed and the figures would equal the baseline's; pass {option} "
                        f"{need} or more")


def check_context_tokens(spec, context: int, option: str = "--context", label: str | None = None) -> None:
    """A prompt of `context` tokens must let a lossy `spec` compress a block that the continuation
    reads (see `measure.prompt.min_context_tokens`)."""
    from ..measure.evaluate import is_lossy
    from ..measure.prompt import min_context_tokens

    need = min_context_tokens(spec) if is_lossy(spec) else 1
    if context < need:
        name = label or spec.name or "the spec"
        why = (f": it keeps sinks {spec.sinks} + window {spec.window} tokens in full precision and compresses "
               f"{spec.block_size} at a time, so nothing of the context would be compressed" if is_lossy(spec) else "")
        raise UserError(f"{option} {context} is too few for {name}{why}; pass {option} {need} or more")


def add_prompt_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """--context and the grid crossed with the uniform candidates: --windows, --keep, --policies."""
    from ..spec import EVICTION_POLICIES

    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="prompt compression: measure every candidate by prefilling N context tokens at once, "
                             "then teacher-forcing the token counts given (see `kvcompress eval --context`); the "
                             "ratio is then the whole cache's at the end of the context")
    parser.add_argument("--windows", default=None,
                        help="full-precision windows to cross the candidates with, comma-separated (default: "
                             "--window)")
    parser.add_argument("--keep", default=None,
                        help="fractions of the prompt kept by eviction to cross the candidates with, comma-separated "
                             "in (0, 1]; 1 = no eviction (needs --context)")
    parser.add_argument("--policies", default="snapkv",
                        help=f"eviction policies crossed with --keep, comma-separated among {', '.join(EVICTION_POLICIES)}")


def prompt_grid_from_args(args: argparse.Namespace) -> tuple[list[int] | None, list | None]:
    """(windows, evictions) for `tuning.candidates.uniform_candidates` from `add_prompt_grid_arguments`."""
    from ..io import parse_list
    from ..tuning.candidates import eviction_grid

    if args.context is not None:
        check_tokens(args.context, "--context", 1)
    windows = parse_list(args.windows, int, "--windows value") if args.windows else None
    if windows is not None and any(w < 0 for w in windows):
        raise UserError(f"--windows {args.windows}: windows must be 0 or more tokens")
    evictions = None
    if args.keep:
        if args.context is None:
            raise UserError("--keep evicts prompt tokens, which only the prompt protocol measures: add --context N")
        keeps = parse_list(args.keep, float, "--keep value")
        try:
            evictions = eviction_grid(parse_list(args.policies), keeps)
        except ValueError as err:
            raise UserError(f"--keep {args.keep} / --policies {args.policies}: {err}") from None
    return windows, evictions


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
    options = RayOptions(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                         cpus_per_worker=args.ray_cpus_per_worker, gpus_per_worker=args.ray_gpus_per_worker,
                         num_cpus=args.ray_num_cpus, retries=args.ray_retries)
    if options.address is not None:
        join_ray_cluster(options, f"--ray {args.ray}")
    return options


def join_ray_cluster(options, option: str) -> None:
    """Join the cluster at `options.address` now, before any work: a missing cluster is a UserError
    naming `option` (Ray's own advice names a flag kvcompress does not have)."""
    from ..distributed import connect

    try:
        connect(options)
    except ConnectionError as err:
        why = str(err).split(". ")[0].rstrip(".")
        raise UserError(f"{option}: could not join a Ray cluster ({why}); start one with `ray start --head` (then "
                        "--ray auto finds it), pass its address, or give a bare --ray to start a local cluster "
                        "in this process") from None


def ray_executor(options, args: argparse.Namespace, model):
    """A `distributed.RayExecutor` for `options` (None: None, the work runs here); its actors load
    --model/--dtype/--device and are refused if their model differs from `model`."""
    if options is None:
        return None
    from ..distributed import RayExecutor

    return RayExecutor(options, (args.model, args.dtype, str(args.device)), model=model)
