"""Text for calibration, selection and reports: the embedded corpus, or a UTF-8 file of your own.

The embedded corpus is CPython's `pydoc_data.topics` (the text behind `help("assert")` and
friends; about 465k characters of English technical prose, ~113k SmolLM2 tokens). Its topics
are joined in sorted key order, separated by blank lines, into one deterministic text, which
is cut at fixed character fractions into three disjoint parts, one per purpose:

    calibration: [0, 30%)    calibration artifacts (first 4096 tokens) and the tuning / sweep text
                             of `tune` and `measure-presets` (from token 20000)
    selection:   [30%, 40%)  what chooses a setting: tune's verification and retries, the choice
                             of the measured presets (~11k tokens)
    report:      [40%, 100%) what quality is reported on: the default of `eval`, `analyze`,
                             `bench`, tasks (~68k tokens)

Each cut is moved to the paragraph break at or after its mark (or kept at the mark when the
text has no later break). The report part is exactly the former "evaluation" part (same cut at
40%), so figures measured on its first tokens before the selection part existed are unchanged;
"evaluation" is still accepted as another name for it. A text file given by the user
(`--corpus`) is split by the same fractions (`split_ranges`), so a command reads the same part
of it as it would of the embedded corpus; part "all" reads a text whole.

`corpus_slice` returns the token ids of a part together with a record of what was read (source,
part, character range, token range, hash of the ids) that every JSON result carries.

This module does not download anything, does not pick prompts or tasks, does not chunk
text for evaluation, and does not cache tokenizations. The embedded text is fixed for a
given Python version but may differ between Python versions (CPython updates its docs);
`corpus_fingerprint()` identifies it in results.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import content_hash

# Fractions of the text (in characters) where each part ends; the last part ends at the end.
PART_ENDS = {"calibration": 0.3, "selection": 0.4, "report": 1.0}
PARTS = tuple(PART_ENDS)
ALIASES = {"evaluation": "report"}  # the report part's former name
WHOLE = "all"
SELECTION_PARTS = ("calibration", "selection")  # text a selection (tune, preset choice) may read
_SEPARATOR = "\n\n"


class CorpusError(RuntimeError):
    """Text could not be read or has too few tokens; the message says why and what to do."""


@functools.lru_cache(maxsize=1)
def full_text() -> str:
    """The whole embedded corpus: pydoc topics in sorted key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return _SEPARATOR.join(topics[key].strip() for key in sorted(topics))


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


@functools.lru_cache(maxsize=1)
def part_ranges() -> dict[str, tuple[int, int]]:
    """Character ranges `[start, end)` of the parts within `full_text()`; disjoint and fixed."""
    return split_ranges(full_text())


def canonical_part(part: str) -> str:
    """The part's name ("evaluation" -> "report"); CorpusError naming the valid ones if unknown."""
    part = ALIASES.get(part, part)
    if part not in PARTS and part != WHOLE:
        raise CorpusError(f"Unknown corpus part {part!r}; use one of {', '.join(PARTS)} (or {WHOLE!r} for a "
                          "whole text file).")
    return part


def part_text(part: str, text: str | None = None) -> str:
    """The text of one part of `text` (default: the embedded corpus): "calibration", "selection", "report"."""
    part = canonical_part(part)
    whole = full_text() if text is None else text
    if part == WHOLE:
        return whole
    start, end = (part_ranges() if text is None else split_ranges(text))[part]
    return whole[start:end]


def calibration_text() -> str:
    """The calibration part of the embedded corpus (first ~30%)."""
    return part_text("calibration")


def selection_text() -> str:
    """The selection part of the embedded corpus (~30% to ~40%)."""
    return part_text("selection")


def report_text() -> str:
    """The report part of the embedded corpus (the last ~60%; quality is reported on it)."""
    return part_text("report")


evaluation_text = report_text  # the report part's former name


def require_selection_text(record: dict, what: str) -> None:
    """ValueError unless the text `record` (from `corpus_slice`) is a part a selection may read.

    A setting chosen on report text would be reported on the text that chose it (optimistic).
    """
    part = record.get("part")
    if part not in SELECTION_PARTS:
        raise ValueError(f"{what} must not read the {part!r} part of the corpus: selection reads only "
                         f"{' or '.join(SELECTION_PARTS)} text, so that reports (on the report part) stay unbiased")


def corpus_fingerprint() -> dict[str, object]:
    """What identifies the embedded corpus in results: source, Python version, sizes, sha256 prefix."""
    text = full_text()
    return {"source": "pydoc_data.topics", "python": "%d.%d.%d" % sys.version_info[:3],
            "chars": len(text), "ranges": {k: list(v) for k, v in part_ranges().items()},
            "sha256": content_hash(text)}


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
        record: {"source": "embedded:pydoc_data.topics" or "file:PATH", "part", "chars": [start, end)
            of the part in the whole text, "tokens": [first, last + 1) within the part, "sha256" of
            the ids}; JSON-ready, what results say they read.
    """

    ids: torch.LongTensor
    record: dict


def corpus_slice(tokenizer, part: str = "report", n_tokens: int | None = None,
                 path: str | os.PathLike | None = None, offset: int = 0) -> CorpusSlice:
    """Token ids `[offset, offset + n_tokens)` of a part of the embedded corpus, or of the same part
    of the text file `path` (split the same way; part "all" reads the file whole), with the record.

    Tokenized without special tokens (no BOS). CorpusError if the part has too few tokens.
    `offset` lets callers take disjoint stretches of one part (e.g. tuning text past what
    calibration artifacts read).
    """
    if isinstance(offset, bool) or int(offset) != offset or offset < 0:
        raise CorpusError(f"offset must be a non-negative integer, got {offset!r}.")
    if n_tokens is not None and (isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 1):
        raise CorpusError(f"n_tokens must be a positive integer, got {n_tokens!r}.")
    part = canonical_part(part)
    if path is not None:
        whole, source = load_text(path), f"file:{path}"
        where = f"{path}" if part == WHOLE else f"the {part} part of {path} (its {_share(part)})"
    else:
        whole, source = full_text(), "embedded:pydoc_data.topics"
        where = f"the {part} part of the embedded corpus"
    if part == WHOLE:
        chars = (0, len(whole))
    else:
        chars = (split_ranges(whole) if path is not None else part_ranges())[part]
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
    record = {"source": source, "part": part, "chars": list(chars),
              "tokens": [int(offset), int(offset) + len(ids)], "sha256": content_hash(ids)}
    return CorpusSlice(torch.tensor([ids], dtype=torch.long), record)


def corpus_tokens(tokenizer, part: str = "report", n_tokens: int | None = None,
                  path: str | os.PathLike | None = None, offset: int = 0) -> torch.LongTensor:
    """Token ids of a corpus part (see `corpus_slice`), shape (1, n), without the record."""
    return corpus_slice(tokenizer, part, n_tokens, path, offset).ids


def _share(part: str) -> str:
    """"30% to 40% of the text" for a part (for messages)."""
    ends = list(PART_ENDS.values())
    i = PARTS.index(part)
    start = 0.0 if i == 0 else ends[i - 1]
    return f"{start:.0%} to {ends[i]:.0%} of the text"
