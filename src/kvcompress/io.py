"""Small file and text mechanisms used everywhere: the user cache folder, atomic writes (files
and whole folders), content hashes, comma lists.

Each lives here once. Atomic writes go to a temporary sibling and are renamed into place, so a
reader (or a run resumed after a kill) sees the old file or the new one, never half of one.
This module knows nothing about models, specs or measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


CACHE_ENV = "KVCOMPRESS_CACHE"


def cache_root() -> Path:
    """The kvcompress user cache folder (not created here): `$KVCOMPRESS_CACHE`, else
    `$XDG_CACHE_HOME/kvcompress`, else `~/.cache/kvcompress`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kvcompress"
    return Path.home() / ".cache" / "kvcompress"


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run `write(tmp)` to fill a temporary sibling of `path`, then rename it onto `path`.

    Creates parent folders. On any error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write `data` as indented JSON (with a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def content_hash(data: Any, length: int = 16) -> str:
    """Short sha256 hex digest of `data`: bytes and str as they are, anything else as canonical JSON."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray)):
        data = json.dumps(data, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 hex digest of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def parse_list(text: str, item: Callable[[str], T] = str, what: str = "value") -> tuple[T, ...]:
    """'a, b,,c' -> (item('a'), item('b'), item('c')); raises ValueError naming `what` on a bad item."""
    out = []
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        try:
            out.append(item(part))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what} {part!r} in {text!r} is not valid: {err}") from None
    return tuple(out)


# --------------------------------------------------------------------------- whole folders

MANIFEST_NAME = "COMPLETE"
TMP_MARK = ".tmp-"
STALE_TMP_SECONDS = 6 * 3600  # a temporary folder older than this was left by a killed writer


class DamagedDirectoryError(ValueError):
    """A folder written by `write_directory_atomic` is incomplete or was changed afterwards."""


def _write_manifest(folder: Path, info: dict[str, Any], checksums: bool) -> None:
    listed = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME]
    manifest = dict(info, files={p.name: p.stat().st_size for p in listed},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if checksums:
        manifest["sha256"] = {p.name: file_sha256(p) for p in listed}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def check_directory(folder: Path) -> dict[str, Any]:
    """The manifest of a folder written by `write_directory_atomic`; DamagedDirectoryError if a
    file it lists is missing, has another size or (where the manifest records one) another
    sha256, or if there is no readable manifest."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DamagedDirectoryError(f"no {MANIFEST_NAME} manifest, so it was not written by kvcompress or is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, checksums = manifest["files"], manifest.get("sha256", {})
        if not isinstance(files, dict) or not isinstance(checksums, dict):
            raise TypeError("'files' and 'sha256' must be objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedDirectoryError(f"unreadable {MANIFEST_NAME} manifest ({exc})") from exc
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedDirectoryError(f"{name} is missing")
        if path.stat().st_size != size:
            raise DamagedDirectoryError(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    for name, expected in checksums.items():
        if name not in files:
            raise DamagedDirectoryError(f"the manifest has a checksum of {name} but does not list it")
        if file_sha256(folder / name) != expected:
            raise DamagedDirectoryError(f"{name} does not match its sha256 in the manifest")
    return manifest


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _owner_prefix(final: Path) -> str:
    """Name prefix of our temporary folder for `final`: it records the owner, `<pid>@<host>~`."""
    return f".{final.name}{TMP_MARK}{os.getpid()}@{_host()}~"


def _owner(tmp: Path, final: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a temporary folder's name, or None (a name without an owner)."""
    rest = tmp.name[len(f".{final.name}{TMP_MARK}"):]
    pid, at, tail = rest.partition("@")
    if not at or "~" not in tail or not pid.isdigit():
        return None
    return int(pid), tail.rsplit("~", 1)[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep it
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Remove temporary folders of `final` left by killed writers: at once when the owner recorded
    in the name is a process of this host that no longer runs, else after STALE_TMP_SECONDS
    (owner on another host, or a name without an owner)."""
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        try:
            owner = _owner(tmp, final)
            gone = owner is not None and owner[1] == _host() and owner[0] != os.getpid() and not _pid_alive(owner[0])
            if gone or now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def write_directory_atomic(final: Path, write: Callable[[Path], dict[str, Any]], checksums: bool = False) -> None:
    """Run `write(tmp_dir)` in a temporary sibling of `final`, add a manifest, rename into place.

    `write` fills the folder and returns extra manifest fields. The manifest lists every file's
    size, and with `checksums` also its sha256 (both checked by `check_directory`). If it fails, the temporary
    folder is removed and `final` is untouched. If another process finished first, its copy is
    kept and ours discarded. The temporary folder's name records its owner (pid and host), so
    the next call removes one left by a killed writer as soon as that process is gone.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_owner_prefix(final), dir=final.parent))
    try:
        info = write(tmp)
        _write_manifest(tmp, info, checksums)
        try:
            os.replace(tmp, final)
        except OSError:
            if (final / MANIFEST_NAME).is_file():  # a concurrent writer won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
