"""Speed and memory of caches (kvcompress presets, DynamicCache, transformers' QuantizedCache):
decode and prefill timing, peak memory in a child process, capacity under a memory budget,
and the markdown and plot that present them. This package measures; it changes no cache.
"""
