"""A model loader for Ray workers in tests: the tiny random Llama and the character tokenizer.

Ray workers import this module by name (the tests put this folder on their PYTHONPATH), so
a worker builds the same model as the test process, from its seed, without shipping it.
"""

from __future__ import annotations

from tiny_models import SEEDS, tiny_llama
from tiny_text import CharTokenizer


def tiny_llama_loader(_settings):
    """(model, tokenizer) for any settings: tiny Llama with the seed whose greedy runs have clear margins."""
    return tiny_llama(seed=SEEDS["llama"]), CharTokenizer()

