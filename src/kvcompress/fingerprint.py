"""What identifies a measurement: library versions, the model (config and weights), the text, the spec.

A saved measurement (sweep record, tune state) is reused only when its fingerprint equals the new
run's; `mismatch` says what changed. `environment()`: kvcompress, transformers and torch versions.
`weights_hash(model)`: per parameter, 64 evenly spaced elements and the float64 sum (one read of
the weights). `config_fields` / `config_fingerprint`: the config fields shapes and RoPE depend on.
`model_fingerprint`: name, config, dtype, weights. `text_fingerprint(ids, record)`: the corpus
record plus a hash of the ids. `text_config`: the decoder config of a (multimodal) model or config.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ._version import __version__
from .io import content_hash

SAMPLES_PER_TENSOR = 64


def environment() -> dict[str, str]:
    """Versions that shape results: kvcompress, transformers, torch (without a local build suffix)."""
    import transformers

    return {"kvcompress": __version__, "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0]}


@torch.no_grad()
def weights_hash(model, samples: int = SAMPLES_PER_TENSOR) -> str:
    """sha256 prefix over every parameter and buffer: name, shape, dtype, `samples` evenly spaced
    elements and the float64 sum of the tensor (see module doc)."""
    digest = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if n == 0:
            continue
        if flat.is_floating_point() or flat.is_complex():
            total = flat.sum(dtype=torch.float64)
        else:
            total = flat.sum(dtype=torch.int64)
        # float32 linspace rounds n - 1 up to n past 2**24 elements (an embedding of 28M): clamp it
        idx = torch.linspace(0, n - 1, min(samples, n), device=flat.device).round().long().clamp_(max=n - 1)
        digest.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
        digest.update(total.to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def text_config(model_or_config):
    """The text (decoder) config of a model or config (multimodal configs hold it inside)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def config_fields(model_or_config) -> dict[str, Any]:
    """The config fields an artifact depends on: model type, shapes and rope settings."""
    config = text_config(model_or_config)
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
        "partial_rotary_factor": getattr(config, "partial_rotary_factor", None),
        "layer_types": list(getattr(config, "layer_types", None) or []),
    }


def config_fingerprint(model_or_config) -> str:
    """sha256 prefix of `config_fields` as sorted JSON."""
    return content_hash(config_fields(model_or_config))


def model_fingerprint(model) -> dict:
    """What identifies a model's measurements: name, config fingerprint, dtype and `weights_hash`."""
    from .models import model_id

    first = next(model.parameters())
    return {"model": model_id(model), "config": config_fingerprint(model), "dtype": str(first.dtype),
            "weights": weights_hash(model)}


def text_fingerprint(ids: torch.Tensor, record: dict | None = None) -> dict:
    """What identifies a text: its corpus record (source, part, ranges; see `corpus.corpus_slice`),
    its length and a hash of its ids."""
    return {**(record or {}), "n_tokens": int(ids.shape[-1]), "ids_sha256": content_hash(ids.flatten().tolist())}


def mismatch(old: dict | None, new: dict, prefix: str = "") -> str:
    """What differs between two fingerprints, e.g. "torch 2.12.0 -> 2.13.0; model.weights 1a2b -> 3c4d";
    "" when equal; "no fingerprint (an older record)" when `old` is missing."""
    if not isinstance(old, dict):
        return "no fingerprint (an older record)"
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(mismatch(a, b, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key} {_short(a)} -> {_short(b)}")
    return "; ".join(x for x in out if x)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."
