"""Tiny randomly initialised decoder models, one per supported architecture, and shared checks.

No download: each model is built from its transformers config class with small sizes
(2-4 layers, hidden 64, vocab 128). The settings that make each architecture different are
kept: Mistral's grouped KV heads, Qwen2's q/k/v biases, Qwen3's q/k RMSNorm before RoPE,
Gemma 3's interleaved sliding-window and full-attention layers with a single KV head.

Random tiny models have near-tied next-token logits, so "greedy tokens are equal" is only a
meaningful claim where the uncompressed run's top-1 margin is larger than the compressed
run's logit error. `SEEDS` names, per architecture, a weight seed whose greedy run has such
margins, and `assert_same_greedy` checks that premise at every step (a test fails, naming
the step, if it does not hold) before comparing tokens.

This module does not build models with pretrained weights (see `kvcompress.models`).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
GEMMA3_WINDOW = 80  # sliding window of the tiny Gemma 3 (transformers keeps window - 1 tokens)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
               pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.02,
               tie_word_embeddings=False)


def _build(model_cls, config_cls, seed: int, dtype: torch.dtype, settings: dict, overrides: dict) -> PreTrainedModel:
    settings = {**_COMMON, **settings, **overrides}
    torch.manual_seed(seed)
    return model_cls(config_cls(**settings)).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """Llama (the SmolLM2 architecture): 2 layers, 4 query heads, 2 KV heads, head_dim 32."""
    return _build(LlamaForCausalLM, LlamaConfig, seed, dtype, {}, overrides)


def tiny_mistral(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """Mistral with grouped-query attention (4 query heads share 1 KV head), no sliding window.

    Pass `sliding_window=N` to get Mistral's sliding-window layers.
    """
    settings = dict(num_key_value_heads=1, sliding_window=None)
    return _build(MistralForCausalLM, MistralConfig, seed, dtype, settings, overrides)


def tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """Qwen2 / Qwen2.5: biases on the q, k and v projections (checked by the tests)."""
    return _build(Qwen2ForCausalLM, Qwen2Config, seed, dtype, {}, overrides)


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """Qwen3: RMSNorm on queries and keys before RoPE, no projection biases."""
    return _build(Qwen3ForCausalLM, Qwen3Config, seed, dtype, {}, overrides)


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """Gemma 3 text model: layers [sliding, sliding, full, sliding], window 48, one KV head.

    head_dim is 32 here for speed (Gemma 3 uses 256; pass head_dim=256 for that); the
    attention scale follows head_dim through `query_pre_attn_scalar`.
    """
    head_dim = overrides.get("head_dim", 32)
    settings = dict(num_hidden_layers=4, num_key_value_heads=1, sliding_window=GEMMA3_WINDOW,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                    query_pre_attn_scalar=head_dim)
    settings.update(overrides)
    settings["num_hidden_layers"] = len(settings["layer_types"])
    return _build(Gemma3ForCausalLM, Gemma3TextConfig, seed, dtype, {}, settings)


ARCHITECTURES = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3,
}


# Weight seed per architecture whose uncompressed greedy continuation of `prompt(100)` has
# top-1 margins well above int8 logit errors (checked at every step by `assert_same_greedy`).
SEEDS = {"llama": 2, "mistral": 2, "qwen2": 0, "qwen3": 2, "gemma3": 6}


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, n) random token ids in [3, VOCAB) (0, 1, 2 are pad, eos, bos)."""
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def quant_spec(bits: int, window: int = 16, sinks: int = 4, block_size: int = 32, **key_extra) -> dict:
    """KIVI-style spec (K per-channel, V per-token, groups of 32) with a small window.

    `key_extra` goes into the key spec, e.g. key_space="pre_rope" or method="hadamard+quant".
    """
    value_extra = {k: v for k, v in key_extra.items() if k == "method"}
    return {"key": {"method": "quant", "bits": bits, "axis": "channel", "group_size": 32, **key_extra},
            "value": {"method": "quant", "bits": bits, "axis": "token", "group_size": 32, **value_extra},
            "window": window, "sinks": sinks, "block_size": block_size}


NO_COMPRESSION = {"key": {"method": "none"}, "value": {"method": "none"}, "window": 16, "sinks": 4, "block_size": 32}


def assert_same_greedy(exact, compressed, what: str = "") -> None:
    """Greedy `generate` outputs (return_dict_in_generate, output_logits) give the same tokens.

    First checks the premise that makes token equality meaningful: at every step the exact
    run's top-1 logit beats its runner-up by more than twice the largest logit difference
    between the two runs (so no perturbation of that size could change the argmax).
    """
    for step, (a, b) in enumerate(zip(exact.logits, compressed.logits)):
        top2 = a.float().topk(2, dim=-1).values  # (batch, 2)
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        max_diff = (a.float() - b.float()).abs().max().item()
        assert margin > 2 * max_diff, (
            f"{what} step {step}: top-1 margin {margin:.3g} is not above 2 x max_diff {max_diff:.3g}; "
            "greedy equality would be luck here (choose another seed in tiny_models.SEEDS)")
    assert torch.equal(exact.sequences, compressed.sequences), f"{what}: greedy tokens differ"
