"""Build, load and call the CPU decode kernel (`cpu_decode.cpp`, `cpu_codebook.cpp`) for a `CompressedLayer`.

`attend(layer, query, mask, scaling)` computes what `kernels.reference.attend_compressed` computes,
from the stored codes: uniform `QuantCodec` keys (post-RoPE) and values, or codebook codecs
(`kernels.cpu_codebook`); `cpu_paged.cpp` and `cpu_paged_write.cpp` (`kernels.cpu_paged`) share the
build. It returns None (the caller runs the torch path) where the kernel does not apply:
`KVCOMPRESS_KERNELS=torch`, unbuildable (ONE warning per process; an error with `KVCOMPRESS_KERNELS=cpu`), non-CPU tensors,
other codecs, a mask not (B or 1, 1, 1, seq).
The extension is built on first use into `ext/<key>` of the cache folder (`io.cache_root`,
`$KVCOMPRESS_CACHE`; the key hashes sources, versions, flags and CPU), atomically and with the
library's size and sha256 checked before each load; `python -m kvcompress.kernels.cpu` builds it.
It is compiled for this CPU (`-march=native`: AVX-512, AVX2 or plain C++ loops, `module.isa()`
says which); `KVCOMPRESS_CPU_CFLAGS` adds compiler flags, e.g. `-mno-avx512f` builds the AVX2 path
on an AVX-512 machine (`make test-isa` tests the two narrower paths that way).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import sys
import warnings
from math import lcm
from pathlib import Path

import torch

from ..codecs.quant import QuantCodec
from ..io import DamagedDirectoryError, cache_root, check_directory, write_directory_atomic
from . import ENV, cpu_codebook, mode

SOURCE = Path(__file__).with_name("cpu_decode.cpp")  # defines the module; the files below are compiled with it
EXTRA_SOURCES = (Path(__file__).with_name("cpu_codebook.cpp"), Path(__file__).with_name("cpu_paged.cpp"),
                 Path(__file__).with_name("cpu_paged_write.cpp"))
HEADERS = (Path(__file__).with_name("cpu_common.h"), Path(__file__).with_name("cpu_split_k.h"))
CFLAGS = ("-O3", "-march=native", "-fopenmp")
CFLAGS_ENV = "KVCOMPRESS_CPU_CFLAGS"  # flags added to CFLAGS (split as a shell would)
LDFLAGS = ("-fopenmp",)
# Compressed tokens per task of the kernel (a multiple of both codecs' rows): small enough to
# share the work of one KV head between threads, large enough to amortise a task's set-up.
BLOCK_TOKENS = 512

log = logging.getLogger(__name__)
_state: dict = {"tried": False, "module": None, "reason": None, "damage": None}


def cflags() -> tuple[str, ...]:
    """The compiler flags of the build: CFLAGS, then those of $KVCOMPRESS_CPU_CFLAGS (a ValueError
    naming the variable if it does not split as a shell would, e.g. an unclosed quote)."""
    text = os.environ.get(CFLAGS_ENV, "")
    try:
        return CFLAGS + tuple(shlex.split(text))
    except ValueError as err:
        raise ValueError(f"{CFLAGS_ENV}={text!r} is not a list of compiler flags ({err}); "
                         f"fix or unset it") from None


def _cpu_signature() -> str:
    """The CPU model and feature flags (the build uses -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor()


def build_key() -> str:
    """Hash of everything the compiled extension depends on."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(path.read_bytes() for path in EXTRA_SOURCES + HEADERS),
                 torch.__version__.encode(), sys.version.encode(),
                 platform.machine().encode(), " ".join(cflags() + LDFLAGS).encode(), _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """Where the extension is built and cached (outside the source tree)."""
    return cache_root() / "ext" / build_key()


def _import_library(name: str, path: Path):
    """Import the extension module `name` from the library file `path`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library(name: str, directory: Path) -> Path | None:
    """The library file of extension `name` in `directory`, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    return None


def _load_checked(name: str, directory: Path):
    """The module of a finished build in `directory`; DamagedDirectoryError if it is not intact.

    The library's size and sha256 are checked against the build's manifest before it is loaded:
    loading a truncated library can kill the process (SIGBUS) instead of raising.
    """
    manifest = check_directory(directory)
    library = _library(name, directory)
    if library is None or library.name not in manifest.get("sha256", {}):
        raise DamagedDirectoryError(f"no checksummed library {name} in the manifest")
    try:
        return _import_library(name, library)
    except ImportError as error:
        raise DamagedDirectoryError(f"the library does not load ({error})") from error


def _compile(name: str, directory: Path):
    """Compile the extension into the empty folder `directory` (torch's cpp_extension); its module."""
    from torch.utils import cpp_extension

    return cpp_extension.load(name=name, sources=[str(SOURCE), *(str(path) for path in EXTRA_SOURCES)],
                              extra_include_paths=[str(path.parent) for path in HEADERS],
                              extra_cflags=list(cflags()), extra_ldflags=list(LDFLAGS), build_directory=str(directory),
                              verbose=False)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _build():
    """The module of the checked build of the extension, or of a fresh one; raises on failure.

    A build is compiled in a temporary folder next to the key folder and renamed into place with
    a manifest of its library's size and sha256 (`io.write_directory_atomic`), so a build that is
    cut short never appears finished. A finished build that fails its check is removed and built
    again, and `_state["damage"]` says why.
    """
    directory = build_directory()
    name = f"kvcompress_cpu_decode_{build_key()}"
    if directory.exists():
        try:
            return _load_checked(name, directory)
        except (DamagedDirectoryError, OSError) as error:
            _state["damage"] = f"the build in {directory} is damaged ({error})"
            _remove(directory)
    log.info("building the kvcompress CPU decode kernel into %s (once; about a minute)", directory)
    built = {}

    def write(tmp: Path) -> dict:
        built["module"] = _compile(name, tmp)
        library = _library(name, tmp)
        if library is None:  # torch renames an extension built twice in one process (name_v1)
            raise RuntimeError(f"the build wrote no library {name} into {tmp}")
        for path in tmp.iterdir():  # keep the library only (objects and ninja files are not reused)
            if path != library:
                _remove(path)
        return {"name": "kvcompress CPU decode kernel", "torch": torch.__version__}

    write_directory_atomic(directory, write, checksums=True)
    return built["module"]


def _short(error: BaseException) -> str:
    """A one-line reason from a build error (the compiler's first error line where there is one)."""
    text = str(error).strip() or type(error).__name__
    errors = [line.strip() for line in text.splitlines() if "error:" in line.lower()]
    first = errors[0] if errors else text.splitlines()[0]
    return f"{type(error).__name__}: {first[:300]}"


def load():
    """The compiled module, or None (KVCOMPRESS_KERNELS=torch, or unbuildable); ONE warning per
    process when a build fails or a damaged build was replaced. With KVCOMPRESS_KERNELS=cpu a
    failed build raises a RuntimeError instead."""
    if mode() == "torch":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as error:  # any build failure falls back to the torch path, loudly once
            _state["reason"] = _short(error)
            if "ninja" in _state["reason"].lower():
                _state["reason"] += " (pip install 'kvcompress[kernel]' installs it)"
            found = f"{_state['damage']}; " if _state.get("damage") else ""
            if mode() != "cpu":
                warnings.warn(
                    f"kvcompress: {found}the CPU decode kernel could not be built ({_state['reason']}); decode "
                    f"steps use the slower pure-torch path with the same results. Set {ENV}=torch to skip the build.",
                    RuntimeWarning, stacklevel=2)
        else:
            if _state.get("damage"):
                warnings.warn(f"kvcompress: {_state['damage']}; the CPU decode kernel was built again",
                              RuntimeWarning, stacklevel=2)
    if _state["module"] is None and mode() == "cpu":
        raise RuntimeError(f"{ENV}=cpu asks for the CPU decode kernel, but it could not be built "
                           f"({_state['reason']}); unset {ENV} to fall back to the pure-torch path")
    return _state["module"]


def unavailable_reason() -> str | None:
    """Why the kernel is not used in this process (None when it is loaded, or not tried yet)."""
    if mode() == "torch":
        return f"disabled by {ENV}=torch"
    return _state["reason"]


def supports_codec(codec) -> bool:
    """Whether the kernel reads this codec's stored form (a plain `QuantCodec` with rows of 8k tokens)."""
    if type(codec) is not QuantCodec:
        return False
    return codec.row_tokens % 8 == 0


def supports(layer) -> bool:
    """Whether the kernel can run this layer's decode step (independent of the build)."""
    return (layer.key_space is None and supports_codec(layer.key_codec) and supports_codec(layer.value_codec)
            and layer.window_keys is not None and layer.window_keys.device.type == "cpu")


def _mask_rows(attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None | bool:
    """(B or 1, seq) bool or float32 rows of the decode step's mask; False if the shape is not handled."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != seq:
        return False
    rows = attention_mask[:, 0, -1, :]  # (B or 1, seq)
    if rows.dtype != torch.bool and rows.dtype != torch.float32:
        rows = rows.float()
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
    """Attention of one decode step over `layer`, from its codes; None where the kernel does not apply.

    Args and result as `kvcompress.kernels.reference.attend_compressed`: query (B, H_q, 1, D),
    attention_mask None / bool / additive (B or 1, 1, 1, seq); returns (B, H_q, 1, D_v).
    """
    if query.shape[2] != 1 or layer.n_compressed == 0 or query.device.type != "cpu":
        return None
    uniform = supports(layer)
    if not uniform and not cpu_codebook.supports(layer):
        return None
    module = load()
    if module is None:
        return None
    dtype = query.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or layer.window_keys.dtype != dtype:
        return None
    seq = layer.held_tokens()
    mask = _mask_rows(attention_mask, seq)
    if mask is False:
        return None
    if not uniform:
        return cpu_codebook.attend(module, layer, query, mask, scaling, BLOCK_TOKENS)
    kc, vc = layer.key_codec, layer.value_codec
    ks, vs = layer.stored_keys, layer.stored_values
    block = lcm(kc.row_tokens, vc.row_tokens)
    block *= max(1, BLOCK_TOKENS // block)
    B, Hq, _, D = query.shape
    out = module.attend(
        _rows(query.reshape(B, Hq, D)),
        _rows(layer.sink_keys), _rows(layer.sink_values), _rows(layer.window_keys), _rows(layer.window_values),
        _rows(ks["codes"]), _rows(ks["scale"]), _rows(ks["zero"]), kc.bits, kc.axis == "channel", kc.group_size,
        _rows(vs["codes"]), _rows(vs["scale"]), _rows(vs["zero"]), vc.bits, vc.axis == "channel", vc.group_size,
        layer.n_compressed, mask, float(scaling), block)
    return out.unsqueeze(2)  # (B, H_q, 1, D_v)


if __name__ == "__main__":  # `python -m kvcompress.kernels.cpu`: build now (used by `make setup`)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = load()
    print(f"kvcompress CPU decode kernel: "
          f"{f'built in {build_directory()} ({built.isa()})' if built else unavailable_reason()}")
    sys.exit(0)
