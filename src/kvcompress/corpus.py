"""Text for calibration and evaluation: the embedded corpus, or a UTF-8 file of your own.

The embedded corpus is CPython's `pydoc_data.topics` (the text behind `help("assert")` and
friends; about 465k characters of English technical prose, ~113k SmolLM2 tokens). Its topics
are joined in sorted key order, separated by blank lines, into one deterministic text, which
is cut at fixed character ranges into two disjoint parts:

    calibration: the first ~40% (cut at the paragraph break at or after the 40% mark)
    evaluation:  everything after that paragraph break

so text used to fit bases or statistics is never text that quality is measured on.
`corpus_tokens` turns a part (or a file) into a `(1, n)` LongTensor of token ids.

This module does not download anything, does not pick prompts or tasks, does not chunk
text for evaluation, and does not cache tokenizations. The embedded text is fixed for a
given Python version but may differ between Python versions (CPython updates its docs);
`corpus_fingerprint()` identifies it in results.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from .io import content_hash

CALIBRATION_FRACTION = 0.4
PARTS = ("calibration", "evaluation")
_SEPARATOR = "\n\n"


class CorpusError(RuntimeError):
    """Text could not be read or has too few tokens; the message says why and what to do."""


@functools.lru_cache(maxsize=1)
def full_text() -> str:
    """The whole embedded corpus: pydoc topics in sorted key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return _SEPARATOR.join(topics[key].strip() for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def part_ranges() -> dict[str, tuple[int, int]]:
    """Character ranges `[start, end)` of the parts within `full_text()`; disjoint and fixed."""
    text = full_text()
    cut = text.find(_SEPARATOR, int(len(text) * CALIBRATION_FRACTION))
    if cut < 0:  # no paragraph break after the mark (cannot happen for the pydoc topics)
        cut = int(len(text) * CALIBRATION_FRACTION)
        return {"calibration": (0, cut), "evaluation": (cut, len(text))}
    return {"calibration": (0, cut), "evaluation": (cut + len(_SEPARATOR), len(text))}


def part_text(part: str) -> str:
    """The text of one part of the embedded corpus: "calibration" or "evaluation"."""
    if part not in PARTS:
        raise CorpusError(f"Unknown corpus part {part!r}; use one of {', '.join(PARTS)}.")
    start, end = part_ranges()[part]
    return full_text()[start:end]


def calibration_text() -> str:
    """The calibration part of the embedded corpus (first ~40%)."""
    return part_text("calibration")


def evaluation_text() -> str:
    """The held-out evaluation part of the embedded corpus (the rest, ~60%)."""
    return part_text("evaluation")


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


def corpus_tokens(tokenizer, part: str = "evaluation", n_tokens: int | None = None,
                  path: str | os.PathLike | None = None, offset: int = 0) -> torch.LongTensor:
    """Token ids of a corpus part (or of the file `path`, which then replaces the part), shape (1, n).

    Tokenized without special tokens (no BOS). With `n_tokens`, ids [offset, offset + n_tokens);
    CorpusError if the text has fewer. `offset` lets callers take disjoint stretches of one
    part (e.g. tuning text and held-out verification text).
    """
    if isinstance(offset, bool) or int(offset) != offset or offset < 0:
        raise CorpusError(f"offset must be a non-negative integer, got {offset!r}.")
    if n_tokens is not None and (isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 1):
        raise CorpusError(f"n_tokens must be a positive integer, got {n_tokens!r}.")
    if path is not None:
        text, where = load_text(path), str(path)
    else:
        text, where = part_text(part), f"the {part} part of the embedded corpus"
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
    return torch.tensor([ids], dtype=torch.long)
