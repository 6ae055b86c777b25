"""Shared fixtures: a tiny random Llama (fast, no download) and the embedded real model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with head_dim 32 (so 32-wide quantization groups fit), random weights."""
    torch.manual_seed(seed)
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct, fp32 on CPU, loaded once."""
    from kvcompress.models import load_model

    return load_model()
