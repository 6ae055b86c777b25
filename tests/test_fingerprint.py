"""Fingerprints tell models, versions and texts apart, and say what changed."""

import torch

from conftest import make_tiny_llama
from kvcompress import fingerprint as fp


def test_a_change_in_a_later_layer_changes_the_weights_hash():
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=0)
    assert fp.weights_hash(a) == fp.weights_hash(b)
    with torch.no_grad():  # one element of the last layer's MLP, nowhere near the first parameter
        b.model.layers[-1].mlp.down_proj.weight[5, 7] += 1e-3
    first_a, first_b = next(a.parameters()), next(b.parameters())
    assert torch.equal(first_a, first_b)  # a checksum of the first parameter alone would collide
    assert fp.weights_hash(a) != fp.weights_hash(b)
    assert fp.model_fingerprint(a)["weights"] != fp.model_fingerprint(b)["weights"]
    assert fp.model_fingerprint(a)["config"] == fp.model_fingerprint(b)["config"]


def test_dtype_and_seed_change_the_model_fingerprint():
    base = fp.model_fingerprint(make_tiny_llama(seed=0))
    assert fp.model_fingerprint(make_tiny_llama(seed=1))["weights"] != base["weights"]
    half = fp.model_fingerprint(make_tiny_llama(seed=0, dtype=torch.bfloat16))
    assert half["dtype"] == "torch.bfloat16" and half["weights"] != base["weights"]


def test_environment_and_text_fingerprints():
    env = fp.environment()
    assert set(env) == {"kvcompress", "transformers", "torch"} and "+" not in env["torch"]
    ids = torch.arange(10)[None]
    record = {"source": "embedded:pydoc_data.topics", "part": "selection", "tokens": [0, 10]}
    text = fp.text_fingerprint(ids, record)
    assert text["part"] == "selection" and text["n_tokens"] == 10
    assert fp.text_fingerprint(ids + 1, record)["ids_sha256"] != text["ids_sha256"]


def test_mismatch_names_what_changed():
    old = {"environment": {"torch": "2.12.0", "kvcompress": "0.1.0"}, "model": {"weights": "aaaa"}}
    new = {"environment": {"torch": "2.13.0", "kvcompress": "0.1.0"}, "model": {"weights": "bbbb"}}
    assert fp.mismatch(old, new) == "environment.torch 2.12.0 -> 2.13.0; model.weights aaaa -> bbbb"
    assert fp.mismatch(new, new) == ""
    assert "older record" in fp.mismatch(None, new)


def test_weights_hash_of_a_tensor_past_float32_index_precision():
    # 2**24 + 4 elements: float32 rounds the last index, 2**24 + 3, up to 2**24 + 4 (out of bounds).
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(2**24 + 4), requires_grad=False)
    before = fp.weights_hash(model)
    model.weight[-1] = 1.0  # the last element is sampled (and summed)
    assert fp.weights_hash(model) != before
