"""Benchmark prompts: token ids from the report part of the embedded corpus (or a text file).

A prompt longer than the text repeats it, and the note returned with it says so (the note
goes into the results). This module does not tokenize anything but the corpus it is given.
"""

from __future__ import annotations

import math

import torch


def build_prompt(tokenizer, n_tokens: int, batch: int = 1, corpus: str | None = None) -> tuple[torch.Tensor, str]:
    """(batch, n_tokens) ids from consecutive stretches of the report part of the corpus, and a note.

    Each row continues where the previous one stopped; the text is repeated end to end when
    it has fewer than batch * n_tokens tokens (the note says so).
    """
    from ..corpus import corpus_tokens

    ids = corpus_tokens(tokenizer, part="report", path=corpus)[0]
    where = f"{corpus or 'embedded corpus'}, report part"
    need = n_tokens * batch
    note = f"{where}"
    if ids.numel() < need:
        ids = ids.repeat(math.ceil(need / ids.numel()))
        note += f" (repeated: the text has fewer than {need} tokens)"
    return ids[:need].reshape(batch, n_tokens), note
