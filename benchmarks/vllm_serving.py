"""kvcompress specs served by vLLM (the plugin): pool capacity, teacher-forced quality, throughput.

Run with the vLLM environment's python (make vllm-setup), each engine in a fresh process:

    .venv-vllm/bin/python benchmarks/vllm_serving.py capacity --space 1 --out runs/vllm/capacity.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py quality --dtype float32 --tokens 512 --chunk 32 \
        --out runs/vllm/quality.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py compare --dtype float32 --tokens 512 --chunk 32 \
        --quality runs/vllm/quality.json --eval-python .venv/bin/python --out runs/vllm/compare
    .venv-vllm/bin/python benchmarks/vllm_serving.py throughput --requests 64 --prompt 2048 --new 128 \\
        --space 1 --out runs/vllm/throughput.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py decode --batch 16 --prompt 128 --short 16 --new 512 \
        --space 1 --out runs/vllm/decode.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py throughput --requests 64 --prompt 128 --new 256 \
        --max-model-len 512 --pool-mib 40 --out runs/vllm/throughput_small_pool.json

capacity: the pool vLLM sizes and logs ("KV cache size: N tokens") for `auto` (the model's bf16), `fp8`
and every servable spec at the same VLLM_CPU_KVCACHE_SPACE (fp8 needs AVX-512 or AMX to run on CPU;
vLLM sizes and logs its pool before refusing, so the figure is read all the same).
quality: teacher-forced next-token distributions on the report text, prefilled in chunks of --chunk
tokens so every scored token reads the stored codes of every token more than one chunk back; KL and
top-1 against `auto` from vLLM's top-64 prompt logprobs (`integrations.vllm.measure`), perplexity change
with its block-bootstrap interval. compare: those figures beside `kvcompress eval`'s for the same specs
and token ids (run in the main environment by --eval-python, chunked and --mode token at block 8).
throughput: --requests prompts of --prompt tokens, --new generated tokens each, one offline batch per
spec in a fresh process, specs interleaved over --repeats rounds; output tokens per second, and how many
whole requests (prompt + new) each pool holds. --pool-mib sizes the pool in MiB (VLLM_CPU_KVCACHE_SPACE
takes whole GiB): the decode-heavy batch above runs where `auto` holds about 4 requests at once and
paged-int4 about 15. --auto-space N adds `auto` in a pool of N GiB to the same interleaved rounds
(auto@NGiB): on a batch that a larger pool does not speed up, no cache gains from being smaller. A timing:
run it on a quiet machine.
decode: --batch requests decoding together (all in every pool), each setting
timed for --short and --new generated tokens; the difference per extra step is the decode step alone
(ms per step and per output token, against auto). Every result file is rewritten after each engine,
and a rerun skips the engines already measured with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["paged-int8", "paged-int4", "paged-hadamard-int4", "paged-int3", "paged-int2", "paged-bits4",
         "paged-bits3", "paged-bits2"]
BASELINES = ["auto", "fp8"]  # vLLM's own caches: the model dtype, and fp8
CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
TOP_K = 64


def fail(message: str) -> None:
    print(f"vllm_serving: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- one engine, in this (child) process -----------------------------------------------------------


def engine(args: argparse.Namespace, **settings):
    from vllm import LLM

    from kvcompress.models import embedded_model_folder

    kv = {"kv_cache_dtype": args.setting} if args.setting in BASELINES and args.setting != "auto" else {}
    if args.pool_mib:  # a pool of MiB (VLLM_CPU_KVCACHE_SPACE takes whole GiB only): vLLM's kv_cache_memory_bytes
        kv["kv_cache_memory_bytes"] = args.pool_mib * 2 ** 20
    return LLM(model=str(embedded_model_folder()), dtype=args.dtype, max_model_len=args.max_model_len,
               enforce_eager=True, seed=0, **kv, **settings)


def child_capacity(args) -> dict:
    llm = engine(args)  # vLLM logs the pool it sized ("KV cache size: N tokens"); the parent reads it
    config = llm.llm_engine.vllm_config.cache_config
    return {"blocks": config.num_gpu_blocks, "block_size": config.block_size}


def report_slice(llm, n_tokens: int, offset: int = 0):
    """Token ids [offset, offset + n_tokens) of the report text, read as `kvcompress eval` reads them."""
    from kvcompress.corpus import CorpusError, corpus_slice

    try:
        return corpus_slice(llm.get_tokenizer(), part="report", n_tokens=n_tokens, offset=offset)
    except CorpusError as err:
        fail(str(err))


def report_ids(llm, n_tokens: int, offset: int = 0) -> list[int]:
    return report_slice(llm, n_tokens, offset).ids[0].tolist()


def child_quality(args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress.integrations.vllm.measure import positions

    llm = engine(args, max_num_batched_tokens=args.chunk, max_logprobs=TOP_K, block_size=32)
    text = report_slice(llm, args.tokens)
    ids = text.ids[0].tolist()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOP_K, flat_logprobs=True, detokenize=False)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    scored = positions(out.prompt_logprobs)  # position j predicts ids[j + 1]; vLLM lists that token at every one
    return {"text": text.record, "positions": [[p.top1, list(p.logprobs.items())] for p in scored],
            "nll": [-p.logprobs[target] for p, target in zip(scored, ids[1:])]}


def child_throughput(args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(args)
    ids = report_ids(llm, args.prompt + 97 * (args.requests - 1))  # request i: tokens [97 i, 97 i + prompt)
    prompts = [TokensPrompt(prompt_token_ids=ids[97 * i:97 * i + args.prompt]) for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.new, min_tokens=args.new, temperature=0, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    config = llm.llm_engine.vllm_config.cache_config
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "capacity_tokens": config.num_gpu_blocks * config.block_size,
            "requests_held": config.num_gpu_blocks * config.block_size // (args.prompt + args.new)}


def child_decode(args) -> dict:
    """Decode time per step at a fixed batch: the same --batch prompts generated twice, --short and --new tokens
    each (prefix caching off, so both prefill the same); the difference over the extra steps is decode alone."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(args, enable_prefix_caching=False, max_num_seqs=args.batch)
    config = llm.llm_engine.vllm_config.cache_config
    capacity = config.num_gpu_blocks * config.block_size
    ids = report_ids(llm, args.prompt + 97 * (args.batch - 1))
    prompts = [TokensPrompt(prompt_token_ids=ids[97 * i:97 * i + args.prompt]) for i in range(args.batch)]

    def timed(new: int) -> float:
        params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
        return seconds

    timed(args.short)  # warm-up
    short, long = timed(args.short), timed(args.new)
    step = (long - short) / (args.new - args.short)
    return {"seconds_short": short, "seconds_long": long, "ms_per_step": 1000 * step,
            "ms_per_token": 1000 * step / args.batch, "capacity_tokens": capacity,
            "fits": args.batch * (args.prompt + args.new) <= capacity}


CHILDREN = {"capacity": child_capacity, "quality": child_quality, "throughput": child_throughput,
            "decode": child_decode}


# ---- the parent: one fresh process per engine ----------------------------------------------------------


def run_child(args, setting: str, extra: list[str], space: int | None = None) -> tuple[dict | None, str]:
    """Run `setting` (a baseline cache dtype or a kvcompress spec) in a fresh process, with a pool of `space`
    GiB (default --space); (result, its log)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(space or args.space), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("KVCOMPRESS_VLLM_SPEC", None)
    if args.pool_mib:  # vLLM's CPU platform would override kv_cache_memory_bytes with VLLM_CPU_KVCACHE_SPACE
        env.pop("VLLM_CPU_KVCACHE_SPACE")
    if setting not in BASELINES:
        env["KVCOMPRESS_VLLM_SPEC"] = setting
    out = Path(args.out).with_suffix(f".{re.sub(r'[^A-Za-z0-9]+', '-', setting)}.child.json")
    cmd = [sys.executable, __file__, "_child", args.command, "--setting", setting, "--result", str(out),
           "--max-model-len", str(args.max_model_len), "--dtype", args.dtype, "--pool-mib", str(args.pool_mib),
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out.exists():
        return None, log
    result = json.loads(out.read_text())
    out.unlink()
    return result, log


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load(path: Path, settings: dict) -> dict:
    """Results measured earlier with the same settings (resume), else an empty record.

    The number of rounds ("repeats") is not one of them: rounds are kept by index, so a rerun with more
    rounds measures only the new ones, and one with fewer reads the first rounds."""
    def same(a: dict, b: dict) -> bool:
        return {k: v for k, v in a.items() if k != "repeats"} == {k: v for k, v in b.items() if k != "repeats"}

    if path.exists():
        data = json.loads(path.read_text())
        if same(data.get("settings", {}), settings):
            data["settings"] = settings
            return data
    return {"settings": settings, "results": {}}


def cmd_capacity(args) -> None:
    path = Path(args.out)
    data = load(path, {"space_gib": args.space, "max_model_len": args.max_model_len, "dtype": args.dtype})
    for setting in [*BASELINES, *args.specs]:
        if setting in data["results"]:
            continue
        result, log = run_child(args, setting, [])
        found = CAPACITY_LINE.findall(log)
        if not found:
            fail(f"{setting}: vLLM logged no KV cache size; its output ends with:\n{log[-2000:]}")
        entry = {"tokens": int(found[-1].replace(",", ""))}
        if result is None:
            entry["note"] = "vLLM sized the pool, then could not run this cache here: " + _last_error(log)
        data["results"][setting] = entry
        save(path, data)
    auto = data["results"]["auto"]["tokens"]
    fp8 = data["results"]["fp8"]["tokens"]
    print(f"| cache | tokens in {args.space} GiB | x auto | x fp8 |\n|---|---:|---:|---:|")
    for setting, entry in data["results"].items():
        print(f"| {setting} | {entry['tokens']:,} | {entry['tokens'] / auto:.2f} | {entry['tokens'] / fp8:.2f} |")
    for setting, entry in data["results"].items():
        if "note" in entry:
            print(f"{setting}: {entry['note']}")


def _last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if "Error" in line or "error" in line]
    return lines[-1].split("]: ")[-1].strip() if lines else "the engine failed"


def cmd_quality(args) -> None:
    from kvcompress.integrations.vllm.measure import Position, compare

    path = Path(args.out)
    data = load(path, quality_settings(args))
    for setting in ["auto", *args.specs]:
        if setting in data["results"]:
            continue
        result, log = run_child(args, setting, ["--tokens", str(args.tokens), "--chunk", str(args.chunk)])
        if result is None:
            fail(f"{setting}: the engine failed: {_last_error(log)}")
        data["results"][setting] = result
        save(path, data)

    def positions(setting):
        return [Position({int(t): lp for t, lp in entries}, top1)
                for top1, entries in data["results"][setting]["positions"]]

    reference = positions("auto")
    print(f"| spec | PPL change [95% CI] | KL vs auto (lower bound, nats) | top-1 agreement | "
          f"ref. mass outside top-{TOP_K} |")
    print("|---|---:|---:|---:|---:|")
    for setting in args.specs:
        c = compare(reference, positions(setting))
        change, (low, high) = ppl_change(data["results"]["auto"]["nll"], data["results"][setting]["nll"])
        print(f"| {setting} | {100 * change:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}] | {c.kl:.5f} | "
              f"{c.top1:.4f} | {c.outside:.4f} |")
    print(f"\n{len(reference)} positions of the report text, prefill chunks of {args.chunk}; every token reads every "
          "token, itself included, from the stored codes. Beside kvcompress eval: the `compare` command.")


def quality_settings(args) -> dict:
    """What a quality result depends on (a rerun resumes only results measured with the same)."""
    return {"tokens": args.tokens, "chunk": args.chunk, "top_k": TOP_K, "dtype": args.dtype,
            "protocol": "every token read from codes"}


def ppl_change(nll_reference: list[float], nll: list[float]) -> tuple[float, tuple[float, float]]:
    """Perplexity change exp(mean nll - mean nll_reference) - 1 and its 95% moving-block bootstrap
    interval (blocks of 64 positions), as `kvcompress eval` computes them."""
    import torch

    from kvcompress.measure.bootstrap import block_bootstrap_ci

    diff = torch.tensor(nll, dtype=torch.float64) - torch.tensor(nll_reference, dtype=torch.float64)
    intervals, _ = block_bootstrap_ci({"diff": diff}, {"ppl": lambda r: torch.exp(r["diff"].mean(dim=1)) - 1.0})
    return math.exp(diff.mean().item()) - 1.0, intervals["ppl"]


# The same spec under `kvcompress eval` (the main environment, run by `compare`): (label, mode, block_size,
# what a query reads in full precision there; in vLLM it reads none).
EVAL_PROTOCOLS = [
    ("kvcompress eval, chunks of 32", "chunked", None,
     "its own 32-token chunk and the token before it (its block is not compressed yet)"),
    ("kvcompress eval --mode token, block 8", "token", 8,
     "its block's earlier tokens and itself until the block of 8 fills (0-7 tokens, mean 3.5)"),
]


def eval_spec(spec: str, block_size: int | None, folder: Path) -> str:
    """`spec`, or a spec file of it with `block_size` written into `folder` (what eval is given)."""
    if block_size is None:
        return spec
    from kvcompress.presets import load_spec

    data = load_spec(spec).to_dict()
    data.update(block_size=block_size, name=f"{data.get('name') or 'spec'}-block{block_size}")
    path = folder / f"{data['name']}.json"
    save(path, data)
    return str(path)


def run_eval(args, spec: str, mode: str, block_size: int | None) -> dict:
    """`kvcompress eval` of `spec` in the main environment (--eval-python); its JSON record (kept and reused)."""
    folder = Path(args.out)
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{spec}-{mode}-{block_size or 'preset'}-{args.tokens}")
    path = folder / f"eval.{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    cmd = [args.eval_python, "-m", "kvcompress.cli.main", "eval", "--spec", eval_spec(spec, block_size, folder),
           "--mode", mode, "--tokens", str(args.tokens), "--dtype", args.dtype, "--threads", "1", "--no-progress",
           "--json", str(path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                         if p))
    print("running:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        fail(f"kvcompress eval of {spec} failed (--eval-python {args.eval_python}): {proc.stderr.strip()[-1500:]}")
    return json.loads(path.read_text())


def cmd_compare(args) -> None:
    """The same specs through vLLM (`quality`, run first) and under `kvcompress eval`, side by side."""
    from kvcompress.integrations.vllm.measure import Position, compare

    if not Path(args.eval_python).exists():
        fail(f"--eval-python {args.eval_python} does not exist; give the python of kvcompress's main environment "
             "(make setup: .venv/bin/python)")
    quality = Path(args.quality)
    data = load(quality, quality_settings(args))
    missing = [s for s in ["auto", *args.specs] if s not in data["results"]]
    if missing:
        fail(f"--quality {quality} has no results for {', '.join(missing)} at these settings; run `quality` with the "
             f"same --tokens {args.tokens} --chunk {args.chunk} --dtype {args.dtype} --out {quality} first")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = data["results"]

    def positions(setting):
        return [Position({int(t): lp for t, lp in entries}, top1) for top1, entries in results[setting]["positions"]]

    print("| spec | measured by | full precision a query reads | PPL change [95% CI] | KL (nats) | top-1 |")
    print("|---|---|---|---:|---:|---:|")
    verdicts = []
    for spec in args.specs:
        c = compare(positions("auto"), positions(spec))
        change, (low, high) = ppl_change(results["auto"]["nll"], results[spec]["nll"])
        print(f"| {spec} | vLLM plugin (chunks of {args.chunk}) | none: every token, itself included, from codes | "
              f"{100 * change:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}] | >= {c.kl:.4f} | {c.top1:.3f} |")
        for label, mode, block, reads in EVAL_PROTOCOLS:
            record = run_eval(args, spec, mode, block)
            if record["text"]["sha256"] != results[spec]["text"]["sha256"]:
                fail(f"{spec}: kvcompress eval read other token ids than vLLM ({record['text']} vs "
                     f"{results[spec]['text']}); both must read the report text's first {args.tokens} tokens")
            e_low, e_high = record["ppl_change_ci95"]
            print(f"| {spec} | {label} | {reads} | {100 * record['ppl_change']:+.2f}% "
                  f"[{100 * e_low:+.2f}, {100 * e_high:+.2f}] | {record['kl']:.4f} | {record['top1']:.3f} |")
            inside = e_low <= change <= e_high and low <= record["ppl_change"] <= high
            verdicts.append(f"{spec}: vLLM vs {label}: PPL changes {'within' if inside else 'NOT within'} each "
                            f"other's 95% interval ({100 * (change - record['ppl_change']):+.2f} points)")
    print(f"\n{len(positions('auto'))} scored positions of the report text, float32 where --dtype float32; each PPL "
          "change against its own uncompressed run (vLLM's own cache; transformers' DynamicCache). vLLM's KL is a "
          f"lower bound from the top-{TOP_K} log-probabilities (see integrations.vllm.measure), eval's is exact.")
    print("\n".join(verdicts))


def cmd_throughput(args) -> None:
    path = Path(args.out)
    data = load(path, {"requests": args.requests, "prompt": args.prompt, "new": args.new, **pool_settings(args),
                       "repeats": args.repeats, "dtype": args.dtype, "max_model_len": args.max_model_len,
                       **({"auto_space_gib": args.auto_space} if args.auto_space else {})})
    big_auto = f"auto@{args.auto_space}GiB" if args.auto_space else None  # auto again, in a pool of --auto-space GiB
    settings = ["auto", "fp8", *([big_auto] if big_auto else []), *args.specs]
    for round_ in range(args.repeats):
        for setting in settings:  # interleaved: every setting once per round
            key = f"{setting}#{round_}"
            if key in data["results"]:
                continue
            extra = ["--requests", str(args.requests), "--prompt", str(args.prompt), "--new", str(args.new)]
            if setting == big_auto:
                result, log = run_child(args, "auto", extra, space=args.auto_space)
            else:
                result, log = run_child(args, setting, extra)
            data["results"][key] = result or {"error": _last_error(log)}
            save(path, data)
    print("| cache | output tokens/s per round | x auto (means) | whole requests the pool holds |\n|---|---|---:|---:|")
    auto = None
    for setting in settings:
        runs = [data["results"][f"{setting}#{r}"] for r in range(args.repeats)]
        rates = [run.get("output_tokens_per_s") for run in runs]
        measured = [r for r in rates if r is not None]
        mean = sum(measured) / len(measured) if measured else None
        auto = mean if setting == "auto" else auto
        ratio = f"{mean / auto:.2f}" if mean and auto else "n/a"
        held = next((run["requests_held"] for run in runs if "requests_held" in run), "n/a")
        print(f"| {setting} | {', '.join('n/a' if r is None else f'{r:.1f}' for r in rates)} | {ratio} | {held} |")


def pool_settings(args) -> dict:
    """How the pool was sized, for a result file's settings (--space GiB, or --pool-mib MiB)."""
    return {"pool_mib": args.pool_mib} if args.pool_mib else {"space_gib": args.space}


def cmd_decode(args) -> None:
    if not 0 < args.short < args.new:
        fail(f"--short must be between 1 and --new - 1 ({args.new - 1}), got {args.short}")
    if args.batch < 1:
        fail(f"--batch must be at least 1, got {args.batch}")
    path = Path(args.out)
    data = load(path, {"batch": args.batch, "prompt": args.prompt, "short": args.short, "new": args.new,
                       **pool_settings(args), "repeats": args.repeats, "dtype": args.dtype})
    settings = ["auto", "fp8", *args.specs]
    for round_ in range(args.repeats):
        for setting in settings:  # interleaved: every setting once per round
            key = f"{setting}#{round_}"
            if key in data["results"]:
                continue
            extra = ["--batch", str(args.batch), "--prompt", str(args.prompt), "--short", str(args.short),
                     "--new", str(args.new)]
            result, log = run_child(args, setting, extra)
            data["results"][key] = result or {"error": _last_error(log)}
            save(path, data)

    def best(setting):  # the fastest round (the least disturbed by the machine)
        steps = [data["results"][f"{setting}#{r}"].get("ms_per_step") for r in range(args.repeats)]
        steps = [x for x in steps if x is not None]
        return (min(steps) if steps else None), steps

    auto = best("auto")[0]
    print(f"| cache | ms per decode step, batch {args.batch} (per round) | ms per output token (best) | x auto |")
    print("|---|---|---:|---:|")
    for setting in settings:
        fastest, steps = best(setting)
        if fastest is None:
            errors = {data["results"][f"{setting}#{r}"].get("error") for r in range(args.repeats)}
            print(f"| {setting} | n/a ({'; '.join(sorted(str(e) for e in errors))}) | | |")
            continue
        ratio = f"{fastest / auto:.2f}" if auto else "n/a"
        print(f"| {setting} | {', '.join(f'{x:.1f}' for x in steps)} | {fastest / args.batch:.2f} | {ratio} |")
    unfit = sorted({k.split("#")[0] for k, v in data["results"].items() if v.get("fits") is False})
    print(f"\n{args.batch} requests of {args.prompt} prompt tokens decoding together, context "
          f"{args.prompt + args.short}-{args.prompt + args.new} tokens: (time of {args.new} new tokens - time of "
          f"{args.short}) / {args.new - args.short} steps." + (f" Did not fit the pool: {', '.join(unfit)}." if unfit
                                                              else " Every pool held the whole batch."))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--specs", type=lambda s: [x for x in s.split(",") if x], default=SPECS,
                        help=f"comma-separated kvcompress specs to serve (default: {','.join(SPECS)})")
    common.add_argument("--space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, GiB of KV pool (default 1)")
    common.add_argument("--pool-mib", type=int, default=0,
                        help="KV pool in MiB instead of --space (vLLM's kv_cache_memory_bytes; throughput and decode)")
    common.add_argument("--max-model-len", type=int, default=2048, help="vLLM's max_model_len (default 2048)")
    common.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="model dtype (default bfloat16; quality: float32 separates the codec from bf16 rounding, "
                        "in which CPU_ATTN and the plugin's backend already differ with identical K/V)")
    common.add_argument("--out", required=True, help="JSON file of results (rewritten after every engine; resumed); "
                        "compare: a folder for eval's records and spec files (reused when present)")
    sub.add_parser("capacity", parents=[common], help="pool size vLLM logs, per cache")
    quality = sub.add_parser("quality", parents=[common], help="teacher-forced KL and top-1 against auto")
    quality.add_argument("--tokens", type=int, default=2048, help="report-text tokens scored (default 2048)")
    quality.add_argument("--chunk", type=int, default=32, help="prefill chunk in tokens (default 32)")
    comparison = sub.add_parser("compare", parents=[common], help="the quality results beside kvcompress eval's "
                                "figures of the same specs (run `quality` first)")
    comparison.add_argument("--quality", required=True, help="JSON file written by `quality` at the same settings")
    comparison.add_argument("--tokens", type=int, default=512, help="report-text tokens, as given to `quality` "
                            "(default 512)")
    comparison.add_argument("--chunk", type=int, default=32, help="prefill chunk given to `quality` (default 32)")
    comparison.add_argument("--eval-python", required=True,
                            help="python of kvcompress's main environment (make setup: .venv/bin/python), which runs "
                            "`kvcompress eval` (transformers >= 5.24, which vllm-cpu's environment cannot hold)")
    throughput = sub.add_parser("throughput", parents=[common], help="offline batch output tokens per second")
    throughput.add_argument("--requests", type=int, default=64, help="requests in the batch (default 64)")
    throughput.add_argument("--prompt", type=int, default=2048 - 128, help="prompt tokens each (default 1920)")
    throughput.add_argument("--new", type=int, default=128, help="generated tokens each (default 128)")
    throughput.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    throughput.add_argument("--auto-space", type=int, default=0,
                            help="also run vLLM's auto cache in a pool of this many GiB (reported as auto@NGiB), "
                            "interleaved: whether a larger pool alone changes this batch's throughput (default: no)")
    decode = sub.add_parser("decode", parents=[common], help="decode time per step and per token at equal batch")
    decode.add_argument("--batch", type=int, default=16, help="requests decoding together (default 16)")
    decode.add_argument("--prompt", type=int, default=128, help="prompt tokens each (default 128)")
    decode.add_argument("--short", type=int, default=16, help="new tokens of the shorter run (default 16)")
    decode.add_argument("--new", type=int, default=512, help="new tokens of the longer run (default 512)")
    decode.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    child = sub.add_parser("_child", help=argparse.SUPPRESS)
    child.add_argument("what", choices=sorted(CHILDREN))
    child.add_argument("--setting", required=True)
    child.add_argument("--result", required=True)
    child.add_argument("--max-model-len", type=int, default=2048)
    child.add_argument("--dtype", default="bfloat16")
    child.add_argument("--pool-mib", type=int, default=0)
    for flag in ("--tokens", "--chunk", "--requests", "--prompt", "--new", "--batch", "--short"):
        child.add_argument(flag, type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "_child":
        Path(args.result).write_text(json.dumps(CHILDREN[args.what](args)))
        return
    if args.space <= 0:
        fail(f"--space must be a positive number of GiB, got {args.space}")
    if args.pool_mib < 0:
        fail(f"--pool-mib must be a positive number of MiB, got {args.pool_mib}")
    if getattr(args, "auto_space", 0) < 0:
        fail(f"--auto-space {args.auto_space}: give a positive number of GiB")
    if getattr(args, "auto_space", 0) and args.pool_mib:
        fail("--auto-space sizes a pool in GiB like --space; it cannot be combined with --pool-mib")
    if args.pool_mib and args.command not in ("throughput", "decode"):
        fail(f"--pool-mib sizes the pool of throughput and decode only; use --space for {args.command}")
    {"capacity": cmd_capacity, "quality": cmd_quality, "compare": cmd_compare,
     "throughput": cmd_throughput, "decode": cmd_decode}[args.command](args)


if __name__ == "__main__":
    main()
