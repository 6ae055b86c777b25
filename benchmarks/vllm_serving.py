"""kvcompress specs served by vLLM (the plugin): pool capacity, teacher-forced quality, throughput.

Run with the vLLM environment's python (make vllm-setup), each engine in a fresh process:

    .venv-vllm/bin/python benchmarks/vllm_serving.py capacity --space 1 --out runs/vllm/capacity.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py quality --dtype float32 --tokens 1024 --chunk 32 \
        --out runs/vllm/quality.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py throughput --requests 64 --prompt 2048 --new 128 \\
        --space 1 --out runs/vllm/throughput.json

capacity: the pool vLLM sizes and logs ("KV cache size: N tokens") for `auto` (the model's bf16), `fp8`
and every servable spec at the same VLLM_CPU_KVCACHE_SPACE (fp8 needs AVX-512 or AMX to run on CPU;
vLLM sizes and logs its pool before refusing, so the figure is read all the same).
quality: teacher-forced next-token distributions on the report text, prefilled in chunks of --chunk
tokens so every scored token reads the stored codes of every token more than one chunk back; KL and
top-1 against `auto` from vLLM's top-64 prompt logprobs (`integrations.vllm.measure`). The same specs'
`kvcompress eval` figures come from the main environment (the printed command).
throughput: --requests prompts of --prompt tokens, --new generated tokens each, one offline batch per
spec in a fresh process, specs interleaved over --repeats rounds; output tokens per second. A timing:
run it on a quiet machine. Every result file is rewritten after each engine, and a rerun skips the
engines already measured with the same settings.
"""

from __future__ import annotations

import argparse
import json
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
    return LLM(model=str(embedded_model_folder()), dtype=args.dtype, max_model_len=args.max_model_len,
               enforce_eager=True, seed=0, **kv, **settings)


def child_capacity(args) -> dict:
    llm = engine(args)  # vLLM logs the pool it sized ("KV cache size: N tokens"); the parent reads it
    config = llm.llm_engine.vllm_config.cache_config
    return {"blocks": config.num_gpu_blocks, "block_size": config.block_size}


def report_ids(llm, n_tokens: int, offset: int = 0) -> list[int]:
    from kvcompress.corpus import report_text

    ids = llm.get_tokenizer().encode(report_text(), add_special_tokens=False)
    if len(ids) < offset + n_tokens:
        fail(f"the report text has {len(ids)} tokens, fewer than {offset + n_tokens}")
    return ids[offset:offset + n_tokens]


def child_quality(args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress.integrations.vllm.measure import positions

    llm = engine(args, max_num_batched_tokens=args.chunk, max_logprobs=TOP_K, block_size=32)
    ids = report_ids(llm, args.tokens)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOP_K, flat_logprobs=True, detokenize=False)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return {"positions": [[p.top1, list(p.logprobs.items())] for p in positions(out.prompt_logprobs)]}


def child_throughput(args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(args)
    prompts = [TokensPrompt(prompt_token_ids=report_ids(llm, args.prompt, offset=97 * i)) for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.new, min_tokens=args.new, temperature=0, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds}


CHILDREN = {"capacity": child_capacity, "quality": child_quality, "throughput": child_throughput}


# ---- the parent: one fresh process per engine ----------------------------------------------------------


def run_child(args, setting: str, extra: list[str]) -> tuple[dict | None, str]:
    """Run `setting` (a baseline cache dtype or a kvcompress spec) in a fresh process; (result, its log)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.space), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("KVCOMPRESS_VLLM_SPEC", None)
    if setting not in BASELINES:
        env["KVCOMPRESS_VLLM_SPEC"] = setting
    out = Path(args.out).with_suffix(f".{re.sub(r'[^A-Za-z0-9]+', '-', setting)}.child.json")
    cmd = [sys.executable, __file__, "_child", args.command, "--setting", setting, "--result", str(out),
           "--max-model-len", str(args.max_model_len), "--dtype", args.dtype, *extra]
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
    """Results measured earlier with the same settings (resume), else an empty record."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("settings") == settings:
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
    data = load(path, {"tokens": args.tokens, "chunk": args.chunk, "top_k": TOP_K, "dtype": args.dtype})
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
    print(f"| spec | KL vs auto (lower bound, nats) | top-1 agreement | ref. mass outside top-{TOP_K} |")
    print("|---|---:|---:|---:|")
    for setting in args.specs:
        c = compare(reference, positions(setting))
        print(f"| {setting} | {c.kl:.5f} | {c.top1:.4f} | {c.outside:.4f} |")
    print(f"\n{len(reference)} positions of the report text, prefill chunks of {args.chunk}. The same specs in "
          f"kvcompress's own cache (main environment):")
    for setting in args.specs:
        print(f"  kvcompress eval --spec {setting} --tokens {args.tokens} --dtype {args.dtype} --threads 1")


def cmd_throughput(args) -> None:
    path = Path(args.out)
    data = load(path, {"requests": args.requests, "prompt": args.prompt, "new": args.new, "space_gib": args.space,
                       "repeats": args.repeats, "dtype": args.dtype})
    for round_ in range(args.repeats):
        for setting in ["auto", "fp8", *args.specs]:  # interleaved: every setting once per round
            key = f"{setting}#{round_}"
            if key in data["results"]:
                continue
            extra = ["--requests", str(args.requests), "--prompt", str(args.prompt), "--new", str(args.new)]
            result, log = run_child(args, setting, extra)
            data["results"][key] = result or {"error": _last_error(log)}
            save(path, data)
    print("| cache | output tokens/s per round |\n|---|---|")
    for setting in ["auto", "fp8", *args.specs]:
        rates = [data["results"][f"{setting}#{r}"].get("output_tokens_per_s") for r in range(args.repeats)]
        print(f"| {setting} | {', '.join('n/a' if r is None else f'{r:.1f}' for r in rates)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--specs", type=lambda s: [x for x in s.split(",") if x], default=SPECS,
                        help=f"comma-separated kvcompress specs to serve (default: {','.join(SPECS)})")
    common.add_argument("--space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, GiB of KV pool (default 1)")
    common.add_argument("--max-model-len", type=int, default=2048, help="vLLM's max_model_len (default 2048)")
    common.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="model dtype (default bfloat16; quality: float32 separates the codec from bf16 rounding, "
                        "in which CPU_ATTN and the plugin's backend already differ with identical K/V)")
    common.add_argument("--out", required=True, help="JSON file of results (rewritten after every engine; resumed)")
    sub.add_parser("capacity", parents=[common], help="pool size vLLM logs, per cache")
    quality = sub.add_parser("quality", parents=[common], help="teacher-forced KL and top-1 against auto")
    quality.add_argument("--tokens", type=int, default=2048, help="report-text tokens scored (default 2048)")
    quality.add_argument("--chunk", type=int, default=32, help="prefill chunk in tokens (default 32)")
    throughput = sub.add_parser("throughput", parents=[common], help="offline batch output tokens per second")
    throughput.add_argument("--requests", type=int, default=64, help="requests in the batch (default 64)")
    throughput.add_argument("--prompt", type=int, default=2048 - 128, help="prompt tokens each (default 1920)")
    throughput.add_argument("--new", type=int, default=128, help="generated tokens each (default 128)")
    throughput.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    child = sub.add_parser("_child", help=argparse.SUPPRESS)
    child.add_argument("what", choices=sorted(CHILDREN))
    child.add_argument("--setting", required=True)
    child.add_argument("--result", required=True)
    child.add_argument("--max-model-len", type=int, default=2048)
    child.add_argument("--dtype", default="bfloat16")
    for flag in ("--tokens", "--chunk", "--requests", "--prompt", "--new"):
        child.add_argument(flag, type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "_child":
        Path(args.result).write_text(json.dumps(CHILDREN[args.what](args)))
        return
    if args.space <= 0:
        fail(f"--space must be a positive number of GiB, got {args.space}")
    {"capacity": cmd_capacity, "quality": cmd_quality, "throughput": cmd_throughput}[args.command](args)


if __name__ == "__main__":
    main()
