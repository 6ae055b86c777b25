"""On a CUDA device: a decode step (cache update, block flush through the quantizer, attention
over the codes) never synchronises with the host. Skipped without CUDA."""

import pytest
import torch

from kvcompress import CompressedCache, enable_fast_attention
from kvcompress.codecs import QuantCodec
from kvcompress.codecs.hadamard import HadamardRotation
from tiny_models import ARCHITECTURES, SEEDS, prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPEC = {"key": {"bits": 4, "axis": "channel", "group_size": 32},
        "value": {"bits": 2, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}


class sync_forbidden:
    """Inside this block a host synchronisation raises (torch.cuda.set_sync_debug_mode("error"))."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return False


@torch.no_grad()
def test_decode_steps_do_not_synchronise():
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"]).to("cuda")
    cache = CompressedCache(model, SPEC)
    with enable_fast_attention(model):  # decode steps read the codes (the Triton kernel when importable)
        model(prompt(81).to("cuda"), cache=cache)  # 4 sinks, 32 tokens compressed, 45 in the window
        tokens = [torch.full((1, 1), 5 + step, device="cuda") for step in range(4)]
        model(tokens[0], cache=cache)  # a first decode step outside: the kernels compile
        with sync_forbidden():  # the window reaches 16 + 32 tokens at the second of these steps: a flush
            for token in tokens[1:]:
                logits = model(token, cache=cache).logits
    assert all(layer.n_compressed == 64 for layer in cache.layers)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_encoding_a_block_does_not_synchronise():
    x = torch.randn(2, 4, 64, 64, device="cuda")
    codecs = [QuantCodec(bits=b, axis=axis, group_size=32) for b in (2, 3, 4, 8) for axis in ("channel", "token")]
    rotation = HadamardRotation()
    for codec in codecs:  # first calls outside: kernels compile, the Hadamard matrix is copied once
        codec.encode(x)
    rotation.forward(x)
    with sync_forbidden():
        for codec in codecs:
            codec.encode(x)
        rotation.inverse(rotation.forward(x))
