"""Speed and memory of caches (kvcompress presets, DynamicCache, transformers' QuantizedCache).

Modules, in the order a run uses them: `kinds` (cache names, building an empty cache), `prompts`
(held-out prompt ids), `nbytes` (stored bytes), `timing` (a timed prefill and decode), `peak` (peak
memory in a fresh process), `capacity` (context and batch under a memory budget), `targets`, `run`
(the interleaved rounds), `render` (markdown, plot, files). The package re-exports nothing, so
running `kvcompress.bench.peak` as a child process does not import it twice.
"""
