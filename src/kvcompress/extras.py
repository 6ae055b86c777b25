"""Optional dependencies: import one, or raise an error that names the extra to install.

The core cache needs only torch, transformers, safetensors and numpy; every other package is an
extra of pyproject.toml (gguf, report, yaml, bench, ray, kernel, gpu, texts; the README's Install
table says what each is for). Every import of an optional package goes through `require_extra`,
so a missing one raises `MissingExtraError` naming the extra (the CLI prints one line, exit
status 2). tqdm and pyyaml come with transformers; a YAML spec file still asks for the `yaml`
extra. `kvcompress bench` skips a missing quanto or HQQ baseline with a note instead
(`bench.kinds.baseline_unavailable`).
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
