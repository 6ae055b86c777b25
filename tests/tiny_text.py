"""A character-level stand-in tokenizer for the tiny random models (vocab 128), so that sweeps,
corpus slicing and tasks can run on them in milliseconds. Not a real tokenizer."""

from __future__ import annotations


class CharTokenizer:
    """Maps each character to an id in 3..127 (0 pad, 1 eos, 2 bos, as in `make_tiny_llama`)."""

    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def __call__(self, text, add_special_tokens=False, **_kwargs):
        return {"input_ids": [3 + ord(c) % 125 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + (int(i) - 3) % 26) for i in ids if not (skip_special_tokens and int(i) < 3))
