"""Calibration: per-layer, per-KV-head bases and channel statistics of K and V, saved as an artifact.

`calibrate(model, ids)` runs the model over calibration text with a capturing `DynamicCache` and
accumulates, for `key_post`, `key_pre` (RoPE undone; absent when it cannot be) and `value`, the
uncentered second moment E[x x^T] and per-channel mean, rms and absmax, and the mean squared
pre-RoPE query per KV head (`query.energy`). An artifact folder holds `calibration.safetensors`
(`<kind>.basis` (L, H, D, D): eigenvectors, largest first; `<kind>.spectrum`, `.mean`, `.rms`,
`.absmax`, `query.energy` (L, H, D); float32) and `metadata.json` (model, config fingerprint,
corpus, versions, `tensors_sha256`). Loading refuses another model's config, changed tensors or
non-finite values. The embedded model's artifact (every kind's calibration part) is built on first
use and cached. The fingerprint covers the config, not the weights: pass the model's own artifact.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ._version import __version__
from .compat import CACHE_KWARG, TRANSFORMERS_VERSION
from .corpus import corpus_fingerprint, corpus_tokens
from .fingerprint import config_fields, config_fingerprint
from .fingerprint import text_config as _text_config
from .io import (
    DamagedDirectoryError,
    cache_root,
    check_directory,
    content_hash,
    write_atomic,
    write_directory_atomic,
    write_json_atomic,
)
from .models import EMBEDDED_DISPLAY_NAME, model_id
from .rope import key_space_for
from .spec import CacheSpec, TensorSpec

KINDS = ("key_post", "key_pre", "value")
STATS = ("basis", "spectrum", "mean", "rms", "absmax")
QUERY_ENERGY = "query.energy"  # (L, H, D) E[sum of q_d^2 over the query heads of each KV head], pre-RoPE
TENSORS_FILE = "calibration.safetensors"
METADATA_FILE = "metadata.json"
FORMAT = "kvcompress-calibration"
FORMAT_VERSION = 1
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 1024
_RECALIBRATE = "re-run `kvcompress calibrate --out DIR` (with the same --model) to rebuild it"


class ArtifactError(ValueError):
    """A calibration artifact is missing, damaged, or for another model; the message says what to do."""


# --------------------------------------------------------------------------- the artifact


@dataclass(eq=False)
class CalibrationArtifact:
    """Calibrated bases and statistics of one model (see module docstring for the layout).

    Attributes:
        tensors: name -> float32 tensor, e.g. "key_pre.basis" (layers, kv_heads, head_dim, head_dim).
        metadata: model name, fingerprint, config fields, corpus, tokens, versions, date.
        path: the folder it was loaded from or saved to, if any.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    path: Path | None = field(default=None)

    @property
    def kinds(self) -> list[str]:
        return [kind for kind in KINDS if f"{kind}.basis" in self.tensors]

    def basis(self, kind: str, layer_idx: int, rank: int | None = None) -> torch.Tensor:
        """(kv_heads, head_dim, rank) orthonormal columns, by decreasing energy."""
        full = self._get(kind, "basis")
        if not 0 <= layer_idx < full.shape[0]:
            raise ArtifactError(f"the artifact has {full.shape[0]} layers, layer {layer_idx} was asked for")
        rank = full.shape[-1] if rank is None else rank
        if not 1 <= rank <= full.shape[-1]:
            raise ArtifactError(f"rank must be in 1..{full.shape[-1]}, got {rank}")
        return full[layer_idx, :, :, :rank]

    def spectrum(self, kind: str, layer_idx: int) -> torch.Tensor:
        """(kv_heads, head_dim) eigenvalues of E[x x^T], largest first (mean energy per direction)."""
        return self._get(kind, "spectrum")[layer_idx]

    def query_energy(self, layer_idx: int) -> torch.Tensor | None:
        """(kv_heads, head_dim) mean squared pre-RoPE query per dimension, summed over the query heads
        of each KV head, or None (an artifact calibrated before queries were recorded)."""
        full = self.tensors.get(QUERY_ENERGY)
        return None if full is None else full[layer_idx]

    def stat(self, kind: str, stat: str, layer_idx: int) -> torch.Tensor:
        """(kv_heads, head_dim) one of the per-channel statistics ("mean", "rms", "absmax") of one layer."""
        if stat not in ("mean", "rms", "absmax"):
            raise ValueError(f"stat must be one of mean, rms, absmax, got {stat!r}")
        full = self._get(kind, stat)
        if not 0 <= layer_idx < full.shape[0]:
            raise ArtifactError(f"the artifact has {full.shape[0]} layers, layer {layer_idx} was asked for")
        return full[layer_idx]

    def mean(self, kind: str, layer_idx: int) -> torch.Tensor:
        """(kv_heads, head_dim) per-channel mean of the states of one layer."""
        full = self._get(kind, "mean")
        if not 0 <= layer_idx < full.shape[0]:
            raise ArtifactError(f"the artifact has {full.shape[0]} layers, layer {layer_idx} was asked for")
        return full[layer_idx]

    def _get(self, kind: str, stat: str) -> torch.Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        name = f"{kind}.{stat}"
        if name not in self.tensors:
            why = self.metadata.get("pre_rope_unavailable") if kind == "key_pre" else None
            raise ArtifactError(f"the calibration artifact{_where(self.path)} has no {name}"
                                + (f" (pre-RoPE keys were unavailable: {why})" if why else f"; {_RECALIBRATE}"))
        return self.tensors[name]

    def check_model(self, model_or_config) -> None:
        """Raise ArtifactError if the artifact was calibrated on a model with another config."""
        mine, theirs = self.metadata.get("fingerprint"), config_fingerprint(model_or_config)
        if mine == theirs:
            return
        fields, stored = config_fields(model_or_config), self.metadata.get("config", {})
        diff = [f"{k}: artifact {stored.get(k)!r} vs model {v!r}" for k, v in fields.items() if stored.get(k) != v]
        raise ArtifactError(
            f"the calibration artifact{_where(self.path)} was made for {self.metadata.get('model')!r}, a model with "
            f"another config ({'; '.join(diff) or f'fingerprint {mine} vs {theirs}'}). Calibrate this model: "
            "`kvcompress calibrate --model M --out DIR`, then pass artifact=DIR / --artifact DIR.")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `calibration.safetensors` and `metadata.json` (with the tensors' checksum) into
        `folder` (each via a temporary file)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder} is a file, not a folder; pass a folder path (it is created if missing)")
        folder.mkdir(parents=True, exist_ok=True)
        self.metadata["tensors_sha256"] = tensors_sha256(self.tensors)
        write_atomic(folder / TENSORS_FILE,
                     lambda tmp: save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp)))
        write_json_atomic(folder / METADATA_FILE, self.metadata)
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model=None) -> CalibrationArtifact:
        """Read an artifact folder; with `model` (or its config), also check it is for that model."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder} is a file, not a calibration artifact folder; pass the folder that "
                                "`kvcompress calibrate --out DIR` wrote")
        if not folder.is_dir():
            raise ArtifactError(f"calibration artifact folder {folder} does not exist; create one with "
                                f"`kvcompress calibrate --out {folder}`")
        for name in (METADATA_FILE, TENSORS_FILE):
            if not (folder / name).is_file():
                raise ArtifactError(f"{folder} is not a calibration artifact: {name} is missing; {_RECALIBRATE}")
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{folder / METADATA_FILE} is not valid JSON ({exc}); {_RECALIBRATE}") from exc
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ArtifactError(f"{folder / METADATA_FILE} is not kvcompress calibration metadata; {_RECALIBRATE}")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{folder} has artifact format version {metadata.get('format_version')}, this "
                                f"kvcompress reads version {FORMAT_VERSION}; {_RECALIBRATE}")
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise ArtifactError(f"{folder / TENSORS_FILE} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                                f"{_RECALIBRATE}") from exc
        artifact = cls(tensors, metadata, folder)
        artifact._check_checksum()
        artifact._check_shapes()
        if model is not None:
            artifact.check_model(model)
        return artifact

    def _check_checksum(self) -> None:
        stored = self.metadata.get("tensors_sha256")
        if stored is None:
            warnings.warn(f"the calibration artifact{_where(self.path)} has no checksum (written by an older "
                          "kvcompress), so damage to its tensors cannot be detected; re-run `kvcompress calibrate` "
                          "to rebuild it", stacklevel=3)
            return
        if tensors_sha256(self.tensors) != stored:
            raise ArtifactError(f"the tensors of the calibration artifact{_where(self.path)} do not match the checksum "
                                f"in its {METADATA_FILE}: the file was changed or damaged after calibration; "
                                f"{_RECALIBRATE}")

    def _check_shapes(self) -> None:
        config = self.metadata.get("config", {})
        shape = (config.get("num_hidden_layers"), config.get("num_key_value_heads"), config.get("head_dim"))
        if "value.basis" not in self.tensors:
            raise ArtifactError(f"the artifact{_where(self.path)} has no value.basis; {_RECALIBRATE}")
        for kind in self.kinds:
            for stat in STATS:
                tensor = self.tensors.get(f"{kind}.{stat}")
                want = shape + (shape[2],) if stat == "basis" else shape
                if tensor is None or tuple(tensor.shape) != want:
                    got = None if tensor is None else tuple(tensor.shape)
                    raise ArtifactError(f"the artifact{_where(self.path)} has {kind}.{stat} of shape {got}, "
                                        f"expected {want}; {_RECALIBRATE}")
                if not torch.isfinite(tensor).all():
                    raise ArtifactError(f"the artifact{_where(self.path)} has NaN or infinite values in {kind}.{stat} "
                                        f"(damaged file, or calibration overflowed: calibrate in float32); "
                                        f"{_RECALIBRATE}")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 hex digest of the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _where(path: Path | None) -> str:
    return f" at {path}" if path else ""


# --------------------------------------------------------------------------- calibration


class _MomentAccumulator:
    """Running E[x x^T], mean, mean square and absmax per (layer, head) for one kind of states."""

    def __init__(self, layers: int, heads: int, dim: int):
        self.second = torch.zeros(layers, heads, dim, dim, dtype=torch.float64)
        self.total = torch.zeros(layers, heads, dim, dtype=torch.float64)
        self.squares = torch.zeros(layers, heads, dim, dtype=torch.float64)
        self.absmax = torch.zeros(layers, heads, dim, dtype=torch.float64)
        self.count = torch.zeros(layers, dtype=torch.float64)

    def add(self, layer: int, x: torch.Tensor) -> None:
        """x: (B, H, T, D) states of one layer."""
        x = x.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1, 2)  # (H, B*T, D)
        self.second[layer] += x.transpose(1, 2) @ x
        self.total[layer] += x.sum(1)
        self.squares[layer] += (x * x).sum(1)
        self.absmax[layer] = torch.maximum(self.absmax[layer], x.abs().amax(1))
        self.count[layer] += x.shape[1]

    def finish(self, prefix: str) -> dict[str, torch.Tensor]:
        if (self.count == 0).any():
            raise RuntimeError(f"no {prefix} states were captured for some layers")
        n = self.count[:, None, None]
        moment = self.second / n[..., None]  # (L, H, D, D)
        moment = (moment + moment.transpose(-1, -2)) / 2
        evals, evecs = torch.linalg.eigh(moment)  # ascending
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        # Deterministic signs: the largest-magnitude entry of every direction is positive.
        peak = evecs.gather(-2, evecs.abs().argmax(-2, keepdim=True))
        evecs = evecs * torch.where(peak < 0, -1.0, 1.0)
        return {
            f"{prefix}.basis": evecs.float(),
            f"{prefix}.spectrum": evals.clamp_min(0).float(),
            f"{prefix}.mean": (self.total / n).float(),
            f"{prefix}.rms": (self.squares / n).sqrt().float(),
            f"{prefix}.absmax": self.absmax.float(),
        }


def _query_hooks(model, energy: torch.Tensor, count: torch.Tensor, heads: int, dim: int, query_heads: int) -> list:
    """Forward hooks adding, per layer, the squared pre-RoPE queries (q_norm's output if the model has
    one, else q_proj's) summed over the query heads that share each KV head into `energy` (L, H, D),
    and the tokens into `count` (L,); no hooks (an empty list) if the attention modules are not found."""
    from torch import nn

    handles = []
    for module in model.modules():
        if not all(hasattr(module, name) for name in ("q_proj", "layer_idx")):
            continue
        source = module.q_norm if isinstance(getattr(module, "q_norm", None), nn.Module) else module.q_proj

        def hook(_module, _args, out, idx=module.layer_idx):
            q = out.detach().to("cpu", torch.float64)
            if q.dim() == 3:  # q_proj: (B, T, Hq * D)
                q = q.reshape(q.shape[0], q.shape[1], -1, dim)
            elif q.dim() == 4 and q.shape[2] != query_heads:  # a q_norm after transposing: (B, Hq, T, D)
                q = q.transpose(1, 2)
            if idx >= energy.shape[0] or q.shape[-1] != dim or q.shape[2] != query_heads:
                return  # not a layout this understands: no statistics for this layer
            grouped = q.square().sum((0, 1)).reshape(heads, q.shape[2] // heads, dim).sum(1)  # (H, D)
            energy[idx] += grouped
            count[idx] += q.shape[0] * q.shape[1]

        handles.append(source.register_forward_hook(hook))
    return handles


class _CapturingCache(DynamicCache):
    """A DynamicCache that also hands every layer's new (B, H, T, D) keys and values to `sink`."""

    def __init__(self, config, sink):
        super().__init__(config=config)
        self._sink = sink

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._sink(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor, *, seq_len: int = DEFAULT_SEQ_LEN, corpus: str = "custom",
              progress: bool = True) -> CalibrationArtifact:
    """Calibrate bases and statistics of K (post- and pre-RoPE) and V on `input_ids`.

    Args:
        model: a causal LM whose attention calls `cache.update` with (B, H, T, D) states.
        input_ids: (1, n) token ids; cut into sequences of `seq_len` tokens (the last, shorter
            one is kept if it has at least 16 tokens), each run from position 0.
        seq_len: tokens per forward; post-RoPE statistics cover positions 0 .. seq_len - 1.
        corpus: a description of the text for the metadata.
    """

    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 16:
        raise ValueError(f"input_ids must have shape (1, n) with n >= 16, got {tuple(input_ids.shape)}")
    if seq_len < 16:
        raise ValueError(f"seq_len must be at least 16, got {seq_len}")
    fields = config_fields(model)
    layers, heads, dim = fields["num_hidden_layers"], fields["num_key_value_heads"], fields["head_dim"]
    inverters, pre_rope_reason = key_space_for(model)
    accumulators = {kind: _MomentAccumulator(layers, heads, dim) for kind in KINDS
                    if kind != "key_pre" or inverters is not None}

    query_energy = torch.zeros(layers, heads, dim, dtype=torch.float64)
    query_count = torch.zeros(layers, dtype=torch.float64)
    handles = _query_hooks(model, query_energy, query_count, heads, dim, fields["num_attention_heads"])

    def sink(layer_idx, keys, values):
        accumulators["key_post"].add(layer_idx, keys)
        accumulators["value"].add(layer_idx, values)
        if inverters is not None:  # positions 0..T-1: every sequence starts a fresh cache
            accumulators["key_pre"].add(layer_idx, inverters[layer_idx].unrotate(keys.float(), start=0))

    device = next(model.parameters()).device
    n = input_ids.shape[1]
    starts = [s for s in range(0, n, seq_len) if min(seq_len, n - s) >= 16]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    start_time = time.perf_counter()
    try:
        for start in tqdm(starts, desc="calibrate", disable=not progress, leave=False):
            chunk = input_ids[:, start:start + seq_len].to(device)
            model(input_ids=chunk, **{CACHE_KWARG: _CapturingCache(model.config, sink)}, use_cache=True, **extra)
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(min(seq_len, n - s) for s in starts)
    tensors: dict[str, torch.Tensor] = {}
    for kind, acc in accumulators.items():
        tensors.update(acc.finish(kind))
    if handles and (query_count > 0).all():
        tensors[QUERY_ENERGY] = (query_energy / query_count[:, None, None]).float()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_id(model),
        "fingerprint": config_fingerprint(model),
        "config": fields,
        "corpus": corpus,
        "tokens": tokens,
        "seq_len": seq_len,
        "sequences": len(starts),
        "statistics": "uncentered second moment E[x x^T] per (layer, kv head); basis = eigenvectors by "
                      "decreasing eigenvalue; spectrum = eigenvalues",
        "kinds": list(accumulators),
        "pre_rope_unavailable": pre_rope_reason,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "kvcompress": __version__,
        "transformers": TRANSFORMERS_VERSION,
        "torch": torch.__version__.split("+")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    return CalibrationArtifact(tensors, metadata)


# --------------------------------------------------------------------------- the embedded model's artifact


def is_embedded(model) -> bool:

    return getattr(model, "kvcompress_name", None) == EMBEDDED_DISPLAY_NAME


def embedded_artifact_dir(model) -> Path:
    """Cache folder of the embedded model's default artifact (keyed by config, texts and settings)."""
    from .corpus import KINDS as TEXT_KINDS

    key = json.dumps([config_fingerprint(model), [corpus_fingerprint(k)["sha256"] for k in TEXT_KINDS],
                      DEFAULT_TOKENS, DEFAULT_SEQ_LEN, FORMAT_VERSION, "all-kinds", QUERY_ENERGY])
    return cache_root() / "artifacts" / f"smollm2-135m-instruct-all-{content_hash(key, 12)}"


def embedded_artifact(model, progress: bool = False) -> CalibrationArtifact:
    """The embedded model's artifact: loaded from the cache, or calibrated and cached on first use.

    Calibrates on the first DEFAULT_TOKENS tokens of the calibration part of every kind of text
    (`all_kinds_ids`: docs, code, plays, equal shares, so no kind is out of distribution). A
    damaged cached copy (a file missing or resized, tensors that do not match their checksum, or
    no checksum) is removed and rebuilt (with a warning).
    """

    final = embedded_artifact_dir(model)
    if final.exists():
        try:
            check_directory(final)
            if "tensors_sha256" not in json.loads((final / METADATA_FILE).read_text(encoding="utf-8")):
                raise ArtifactError("its metadata has no tensors_sha256 checksum")
            return CalibrationArtifact.load(final, model)
        except (DamagedDirectoryError, ArtifactError, ValueError, OSError) as exc:
            warnings.warn(f"the cached calibration artifact at {final} is damaged ({exc}); rebuilding it",
                          stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)

    def write(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        # load_model() saved the tokenizer next to the converted weights.
        tokenizer = AutoTokenizer.from_pretrained(model.kvcompress_load_info["cache_dir"])
        calibrate(model, all_kinds_ids(tokenizer), seq_len=DEFAULT_SEQ_LEN, corpus="all-kinds:calibration",
                  progress=progress).save(tmp)
        return {"name": "calibration artifact of the embedded model"}

    write_directory_atomic(final, write)
    return CalibrationArtifact.load(final, model)


def resolve_artifact(model, artifact=None) -> CalibrationArtifact:
    """The artifact to use for `model`: the one given (checked against the model), else the
    embedded model's cached one; ArtifactError saying how to make one otherwise.

    Args:
        model: the model (or its config).
        artifact: a `CalibrationArtifact`, an artifact folder, or None.
    """
    if isinstance(artifact, CalibrationArtifact):
        artifact.check_model(model)
        return artifact
    if artifact is not None:
        return CalibrationArtifact.load(artifact, model)
    if is_embedded(model):
        return embedded_artifact(model)
    raise ArtifactError(
        "low-rank, pca+codebook and centred codebook specs need a calibration artifact for this model: run `kvcompress calibrate --model M "
        "--out DIR` and pass artifact=DIR (Python) or --artifact DIR (command line)")


def needs_artifact(model, specs) -> bool:
    """Whether any of `specs` (a CacheSpec, a TensorSpec, or an iterable of them) needs a calibration artifact."""
    if isinstance(specs, (CacheSpec, TensorSpec)):
        specs = [specs]
    num_layers = _text_config(model).num_hidden_layers
    return any(s.needs_artifact(num_layers) if isinstance(s, CacheSpec) else s.needs_artifact for s in specs)


def artifact_for(model, specs, artifact=None) -> CalibrationArtifact | None:
    """The calibration artifact for running `specs` on `model`, or None when none is needed or given.

    `artifact` (a `CalibrationArtifact` or a folder) is resolved and checked against the model
    whenever it is given; otherwise one is resolved (the embedded model's is built on first
    use) only if a spec needs it (see `needs_artifact`).
    """
    if artifact is None and not needs_artifact(model, specs):
        return None
    return resolve_artifact(model, artifact)


def all_kinds_ids(tokenizer, tokens_per_kind: int = DEFAULT_TOKENS) -> torch.Tensor:
    """(1, kinds x tokens_per_kind) ids: the first `tokens_per_kind` tokens of every kind's calibration
    part (`corpus.KINDS` order), each kind a whole number of DEFAULT_SEQ_LEN sequences when
    tokens_per_kind is a multiple of it (no calibration sequence mixes kinds)."""
    from .corpus import KINDS as TEXT_KINDS
    from .extras import MissingExtraError

    try:
        return torch.cat([corpus_tokens(tokenizer, part="calibration", n_tokens=tokens_per_kind, kind=kind)
                          for kind in TEXT_KINDS], dim=1)
    except MissingExtraError as err:  # a user asking for bits3 on docs would not know why plays are read
        raise MissingExtraError(f"the embedded model's calibration artifact (for calibrated codecs: bitsN, "
                                f"low-rank, the prompt presets) is calibrated on every kind of text: {err}; or "
                                "pass --artifact DIR made by `kvcompress calibrate`") from None
