"""Optional dependencies: import one, or raise an error that names the extra to install.

The core cache needs only torch, transformers, safetensors and numpy. Everything else
(GGUF loading, plots, YAML specs, benchmark baselines, Triton, Ray) is an extra:
`pip install 'kvcompress[NAME]'`. This module imports nothing optional itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require_extra(extra: str, module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise MissingExtraError naming `kvcompress[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} need(s) the optional package '{module.split('.')[0]}', which is not installed: "
            f"pip install 'kvcompress[{extra}]'") from err
