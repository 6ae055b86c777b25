"""Shared fixtures: a tiny random Llama (fast, no download) and the embedded real model.

Attention settings never leak between tests: the session-scoped models are handed out on
"sdpa", a test that wants attention over the codes switches a model with the `fast_attention`
fixture (restored when the test ends), and `_session_models_stay_on_sdpa` fails any test that
leaves a session-scoped model on another implementation.
"""

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (tests/test_triton.py).
# Triton reads this when it is first imported, and transformers imports it when it is installed.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvcompress import enable_fast_attention


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with head_dim 32 (so 32-wide quantization groups fit), random weights."""
    torch.manual_seed(seed)
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


SESSION_MODELS = ("tiny_llama", "real_model")


def _model_of(value):
    return value[0] if isinstance(value, tuple) else value


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    model = make_tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct, fp32 on CPU, loaded once, on "sdpa"."""
    from kvcompress.models import load_model

    model, tokenizer = load_model()
    assert model.config._attn_implementation == "sdpa"
    return model, tokenizer


@pytest.fixture
def fast_attention():
    """`enable(model) -> model`: the model runs kvcompress's attention (`enable_fast_attention`)
    until the test ends, then gets its previous implementation back."""
    handles = []

    def enable(model):
        handles.append(enable_fast_attention(model))
        return model

    yield enable
    for handle in reversed(handles):
        handle.restore()


@pytest.fixture(autouse=True)
def _session_models_stay_on_sdpa(request):
    """Every session-scoped model a test uses is on "sdpa" before it and after it (and put back, so
    that one failing test cannot change the attention path of the tests after it)."""
    models = {name: _model_of(request.getfixturevalue(name)) for name in SESSION_MODELS
              if name in request.fixturenames}
    for name, model in models.items():
        implementation = model.config._attn_implementation
        assert implementation == "sdpa", f"{name} was handed out on {implementation!r}"
    yield
    left = {name: model.config._attn_implementation for name, model in models.items()
            if model.config._attn_implementation != "sdpa"}
    for name in left:
        models[name].set_attn_implementation("sdpa")
    if left:
        pytest.fail(f"the test left session-scoped models on another attention implementation: {left}")
