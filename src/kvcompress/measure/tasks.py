"""Downstream tasks that run offline: passkey retrieval and generation agreement.

- Passkey: a random 5-digit number hidden at a relative depth of held-out filler, in a prompt of an
  exact token count ("plain" format by default, or "chat"); scored by exact match of the first
  number of the greedy answer, the uncompressed score measured beside.
- Generation agreement: greedy continuations with the compressed vs the uncompressed cache (mean
  matching prefix, exact-match rate); `dataset_texts` takes prompts from a `datasets` dataset when
  that library and a hub are available (`TaskDataError` otherwise).
Compressed runs pass a `CompressedCache` to `generate` with kvcompress's attention where the model
supports it, and restore the model afterwards.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..cache.attention import enable_fast_attention
from ..compat import CACHE_KWARG

PASSKEY_LENGTHS = (256, 512, 1024, 2048)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PROMPT_FORMATS = ("plain", "chat")
_INSTRUCTION = "There is a pass key hidden inside the following text. Find it and memorize it.\n\n"
_QUESTION = "\n\nWhat is the pass key?"
_ANSWER_START = " The pass key is"
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
_PLACEHOLDER = "\u0000BODY\u0000"

CacheFactory = Callable[[], object]


class TaskDataError(RuntimeError):
    """Task data could not be built or loaded; the message says why and what to do instead."""


# --------------------------------------------------------------------------- passkey


@dataclass(frozen=True)
class PasskeyCase:
    """One passkey prompt.

    Attributes:
        length: prompt length in tokens (exact).
        depth: relative position of the needle in the filler, 0..1.
        key: the 5-digit number, as text.
        input_ids: (1, length) token ids.
        needle: [start, stop) positions of the needle sentence in the prompt.
    """

    length: int
    depth: float
    key: str
    input_ids: torch.Tensor
    needle: tuple[int, int] = (0, 0)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _frame(tokenizer, prompt_format: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the instruction + text + question, for the prompt format."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "plain":
        return [], _ids(tokenizer, _ANSWER_START)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use 'plain'")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True,
                                         tokenize=False)
    before, after = text.split(_PLACEHOLDER)
    return _ids(tokenizer, before), _ids(tokenizer, after + _ANSWER_START.strip())


def _snap_to_sentence(filler: list[int], pos: int, tokenizer, reach: int = 32) -> int:
    """The first position at or after `pos` (within `reach`) that follows a token ending a sentence."""
    for p in range(pos, min(pos + reach, len(filler))):
        if p > 0 and tokenizer.decode(filler[p - 1:p]).rstrip(" ").endswith((".", "\n")):
            return p
    return pos


def passkey_cases(tokenizer, lengths: Sequence[int] = PASSKEY_LENGTHS, depths: Sequence[float] = PASSKEY_DEPTHS,
                  *, seed: int = 0, filler_text: str | None = None, prompt_format: str = "plain"
                  ) -> list[PasskeyCase]:
    """One case per (length, depth), each with its own key and its own stretch of filler.

    Args:
        tokenizer: the model's tokenizer.
        lengths: prompt lengths in tokens.
        depths: needle depths, fractions of the filler in [0, 1].
        seed: fixes the keys and the filler offsets.
        filler_text: filler (default: the report part of the embedded corpus).
        prompt_format: "plain" or "chat" (see module doc).
    """
    from ..corpus import report_text

    for depth in depths:
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"passkey depths must lie in [0, 1], got {depth!r}")
    before, after = _frame(tokenizer, prompt_format)
    instruction, question = _ids(tokenizer, _INSTRUCTION), _ids(tokenizer, _QUESTION)
    filler_all = _ids(tokenizer, filler_text if filler_text is not None else report_text())
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = _ids(tokenizer, _NEEDLE.format(key=key))
            n_filler = int(length) - len(before) - len(instruction) - len(needle) - len(question) - len(after)
            if n_filler < 16:
                raise ValueError(f"passkey length {length} leaves no room for filler text; use at least "
                                 f"{int(length) - n_filler + 16} tokens")
            if n_filler > len(filler_all):
                raise TaskDataError(f"the filler text has {len(filler_all)} tokens, fewer than the {n_filler} "
                                    f"a {length}-token prompt needs; use shorter lengths or a longer text")
            start = rng.randint(0, len(filler_all) - n_filler)
            filler = filler_all[start:start + n_filler]
            pos = _snap_to_sentence(filler, int(round(depth * n_filler)), tokenizer)
            ids = before + instruction + filler[:pos] + needle + filler[pos:] + question + after
            start_needle = len(before) + len(instruction) + pos
            cases.append(PasskeyCase(int(length), float(depth), key, torch.tensor([ids], dtype=torch.long),
                                     (start_needle, start_needle + len(needle))))
    return cases


def needle_kept(kept: list[torch.Tensor], needle: tuple[int, int]) -> float | None:
    """Fraction of the needle's tokens that eviction kept, over the (B, H, n_kept) prompt positions
    each evicting layer kept (`Evictor.add_hook`), averaged over layers and KV heads; None when
    nothing was evicted (no eviction spec)."""
    if not kept:
        return None
    start, stop = needle
    hits = [((positions >= start) & (positions < stop)).sum(-1).float() / (stop - start) for positions in kept]
    return torch.stack([h.mean() for h in hits]).mean().item()


def _first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def run_passkey(model, tokenizer, cases: Sequence[PasskeyCase], cache_factory: CacheFactory | None = None,
                max_new_tokens: int = 8) -> dict:
    """Answer every case greedily; score exact match of the first number in the answer.

    Args:
        cache_factory: a callable () -> Cache giving a fresh cache per case (e.g. a
            `CompressedCache`); None for the uncompressed model.

    Returns:
        {"cases": [{"length", "depth", "key", "answer", "correct"[, "needle_kept"]}],
         "by_length": {length: accuracy}, "accuracy": overall accuracy[, "needle_kept": mean fraction]}
        "needle_kept" (caches with eviction): fraction of the needle's tokens the eviction kept,
        averaged over full-attention layers and KV heads.
    """
    device = next(model.parameters()).device
    rows = []
    with enable_fast_attention(model, strict=False):  # restored as it was afterwards
        for case in cases:
            cache = cache_factory() if cache_factory is not None else None
            kept_by_layer: list[torch.Tensor] = []  # prompt positions each evicting layer kept
            for layer in getattr(cache, "layers", []):
                if getattr(layer, "evictor", None) is not None:
                    layer.evictor.add_hook(kept_by_layer.append)
            kwargs = {CACHE_KWARG: cache} if cache is not None else {}
            ids = case.input_ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
            answer = tokenizer.decode(out[0, case.input_ids.shape[1]:], skip_special_tokens=True)
            row = {"length": case.length, "depth": case.depth, "key": case.key, "answer": answer,
                   "correct": _first_number(answer) == case.key}
            fraction = needle_kept(kept_by_layer, case.needle)
            if fraction is not None:
                row["needle_kept"] = fraction
            rows.append(row)
    by_length: dict[str, float] = {}
    for length in dict.fromkeys(r["length"] for r in rows):
        hits = [r["correct"] for r in rows if r["length"] == length]
        by_length[str(length)] = sum(hits) / len(hits)
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    result = {"cases": rows, "by_length": by_length, "accuracy": accuracy}
    kept = [r["needle_kept"] for r in rows if "needle_kept" in r]
    if kept:
        result["needle_kept"] = sum(kept) / len(kept)
    return result


# --------------------------------------------------------------------------- generation agreement


def agreement_prompts(tokenizer, n_prompts: int = 4, prompt_tokens: int = 256, text: str | None = None
                      ) -> list[torch.Tensor]:
    """`n_prompts` prompts of `prompt_tokens` tokens, each (1, prompt_tokens), taken at evenly
    spaced offsets of `text` (default: the report part of the embedded corpus)."""
    from ..corpus import report_text

    if n_prompts < 1 or prompt_tokens < 1:
        raise ValueError(f"n_prompts and prompt_tokens must be positive, got {n_prompts} and {prompt_tokens}")
    ids = _ids(tokenizer, text if text is not None else report_text())
    if len(ids) < prompt_tokens:
        raise TaskDataError(f"the text has {len(ids)} tokens, fewer than one {prompt_tokens}-token prompt")
    step = (len(ids) - prompt_tokens) // n_prompts
    return [torch.tensor([ids[i * step:i * step + prompt_tokens]], dtype=torch.long) for i in range(n_prompts)]


def prompts_from_texts(tokenizer, texts: Sequence[str], prompt_tokens: int) -> list[torch.Tensor]:
    """The first `prompt_tokens` tokens of each text that has that many, each (1, prompt_tokens)."""
    prompts = []
    for text in texts:
        ids = _ids(tokenizer, text)
        if len(ids) >= prompt_tokens:
            prompts.append(torch.tensor([ids[:prompt_tokens]], dtype=torch.long))
    if not prompts:
        raise TaskDataError(f"none of the {len(texts)} texts has {prompt_tokens} tokens; use fewer prompt tokens")
    return prompts


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[torch.Tensor], max_new_tokens: int = 32,
                         cache_factory: CacheFactory | None = None) -> list[list[int]]:
    """The greedy continuation (new token ids only) of each (1, P) prompt; a fresh cache per prompt."""
    device = next(model.parameters()).device
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
    outs = []
    with enable_fast_attention(model, strict=False):  # restored as it was afterwards
        for ids in prompts:
            kwargs = {CACHE_KWARG: cache_factory()} if cache_factory is not None else {}
            out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **kwargs)
            outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def generation_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict:
    """How well `candidate` continuations follow `reference` ones (same prompts, same order).

    Returns:
        {"prompts", "prefix_lengths": matching leading tokens per prompt, "mean_prefix",
         "mean_prefix_fraction": mean of prefix / reference length, "exact_match_rate"}
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference continuations but {len(candidate)} candidates")
    prefixes, fractions, exact = [], [], []
    for ref, cand in zip(reference, candidate):
        n = 0
        while n < min(len(ref), len(cand)) and ref[n] == cand[n]:
            n += 1
        prefixes.append(n)
        fractions.append(n / len(ref) if ref else 1.0)
        exact.append(list(ref) == list(cand))
    count = len(reference)
    return {"prompts": count, "prefix_lengths": prefixes,
            "mean_prefix": sum(prefixes) / count if count else float("nan"),
            "mean_prefix_fraction": sum(fractions) / count if count else float("nan"),
            "exact_match_rate": sum(exact) / count if count else float("nan")}


# --------------------------------------------------------------------------- named datasets


def dataset_texts(name: str, *, config: str | None = None, split: str = "test", field: str = "text",
                  n: int = 8, min_chars: int = 200) -> list[str]:
    """The first `n` texts of at least `min_chars` characters from column `field` of a named dataset.

    Needs the `datasets` library and access to its hub (or its local cache); raises
    TaskDataError saying which is missing otherwise.
    """
    try:
        import datasets
    except ImportError as exc:
        raise TaskDataError(
            f"cannot load dataset {name!r}: the `datasets` library is not installed (pip install datasets). "
            "The offline tasks (passkey, agreement on the embedded corpus or --corpus FILE) need no dataset.") from exc
    try:
        data = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # hub errors come in many types (connection, HTTP, file not found)
        raise TaskDataError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {type(exc).__name__}: {exc}. "
            "Is there hub access from this machine (or a local datasets cache)? Without it, use the embedded "
            "corpus (the default) or --corpus FILE.") from exc
    texts = []
    for row in data:
        if field not in row:
            raise TaskDataError(f"dataset {name!r} has no column {field!r}; its columns are {sorted(row)}")
        value = row[field]
        if isinstance(value, str) and len(value) >= min_chars:
            texts.append(value)
            if len(texts) >= n:
                break
    if not texts:
        raise TaskDataError(f"dataset {name!r} has no {field!r} texts of at least {min_chars} characters")
    return texts
