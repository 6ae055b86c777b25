"""Speed and memory of caches (kvcompress presets, DynamicCache, transformers' QuantizedCache).

One module per job, in the order a run uses them:

    kinds      cache names ("dynamic", "quanto-4", presets, "+monitor"), building an empty cache
    prompts    prompt ids from the held-out corpus
    nbytes     bytes a cache stores (from its tensors) and what a spec should store
    timing     one timed prefill and greedy decode
    peak       peak memory of one generation, in a fresh process (`python -m kvcompress.bench.peak`)
    capacity   longest context and largest batch under a cache memory budget
    targets    the benchmark's targets, checked on a result
    run        BenchConfig and run_benchmark: the interleaved rounds, the results dict
    render     markdown, plot (the `report` extra) and the output files

This package measures; it changes no cache. It re-exports nothing, so that running
`kvcompress.bench.peak` as a child process does not import it twice.
"""
