"""Quickstart: a 1,536-token document in the KV cache, stored several times smaller, and what it costs.

    python examples/quickstart.py      # the embedded SmolLM2-135M-Instruct, CPU

The model reads the first 1,536 tokens of a held-out documentation text into a cache (transformers'
uncompressed one, then the int4 and prompt-6x presets; prompt-6x calibrates once on first use, cached),
then the next 64 tokens of the text in one forward pass. For each cache it prints the bytes the
prompt's cache stores against the fp16 bytes of the same tokens, and how far its next-token distributions over those 64
tokens are from the uncompressed cache's (mean KL, top-1 agreement). Then it generates with prompt-6x.
"""

import torch
from transformers import DynamicCache

from kvcompress import CompressedCache, enable_fast_attention, load_model
from kvcompress.corpus import report_text

PROMPT_TOKENS, NEXT_TOKENS = 1536, 64

model, tokenizer = load_model(dtype=torch.bfloat16)  # bf16: the full-precision window costs fp16 bytes
enable_fast_attention(model)  # decode steps read the codes; eviction scores the prompt's queries
text = tokenizer(report_text(), return_tensors="pt").input_ids  # held out: nothing was calibrated on it
prompt, following = text[:, :PROMPT_TOKENS], text[:, PROMPT_TOKENS:PROMPT_TOKENS + NEXT_TOKENS]


def read(cache):
    """Log-probabilities (NEXT_TOKENS, vocab) at the following tokens, after the prompt went into
    `cache`, and the cache's memory report as the prompt left it (None for transformers' cache)."""
    with torch.inference_mode():
        model(prompt, cache=cache)
        report = cache.memory_report() if isinstance(cache, CompressedCache) else None
        return model(following, cache=cache).logits[0].float().log_softmax(-1), report


reference, _ = read(DynamicCache(config=model.config))
print(f"{PROMPT_TOKENS}-token prompt, then {NEXT_TOKENS} tokens read against the cache; model in bfloat16\n")
for spec in ("int4", "prompt-6x"):
    logprobs, report = read(CompressedCache(model, spec))  # report: the prompt's cache
    kl = (reference.exp() * (reference - logprobs)).sum(-1).mean()
    top1 = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean()
    print(f"{spec:10s} {report.stored_bytes / 2**20:5.2f} MiB stored vs {report.fp16_bytes / 2**20:5.2f} MiB in fp16 "
          f"= {report.ratio:.1f}x smaller; KL {kl:.4f}, top-1 agreement {top1:.2f}")

cache = CompressedCache(model, "prompt-6x")
with torch.inference_mode():
    out = model.generate(prompt, cache=cache, max_new_tokens=24, do_sample=False)
print(f"\nprompt-6x continues the prompt with: {tokenizer.decode(out[0, PROMPT_TOKENS:])!r}")
