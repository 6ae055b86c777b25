"""One vLLM engine in this process, a list of tasks, a JSON file of results (run by the tests' fixtures).

    python tests_vllm/child.py JOB.json OUT.json

JOB: {"engine": {LLM keyword arguments besides the model}, "tasks": [{"name": ..., ...}, ...],
"one_row_at_a_time": bool (optional, see `one_row_at_a_time`)}; the
environment (KVCOMPRESS_VLLM_SPEC, VLLM_CPU_KVCACHE_SPACE) is set by the caller. The engine runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so tasks can read the attention layers and their
pages; the checks that need the pages (`capture`) are computed here from the bytes by hand
(tests/by_hand.py) and returned as numbers for the test to assert on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402


def model_folder() -> str:
    """The embedded model converted for transformers (kvcompress's model cache; `make setup` builds it)."""
    from kvcompress.models import embedded_model_folder

    return str(embedded_model_folder())


def report_ids(llm, n_tokens: int, offset: int = 0) -> list[int]:
    from kvcompress.corpus import report_text

    ids = llm.get_tokenizer().encode(report_text()[:20 * (n_tokens + offset)], add_special_tokens=False)
    assert len(ids) >= n_tokens + offset
    return ids[offset:offset + n_tokens]


def layers(llm) -> dict:
    return llm.llm_engine.vllm_config.compilation_config.static_forward_context


def task_info(llm, task) -> dict:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = llm.llm_engine.vllm_config.cache_config
    first = next(iter(layers(llm).values()))
    return {"num_blocks": config.num_gpu_blocks, "block_size": config.block_size,
            "tokens": config.num_gpu_blocks * config.block_size,
            "impl": f"{type(first.impl).__module__}.{type(first.impl).__qualname__}",
            "cpu_attn_path": AttentionBackendEnum.CPU_ATTN.get_path(),
            "slot_bytes": first.kv_cache.shape[-1] * first.kv_cache.element_size(),
            "kernel": [getattr(layer.impl, "use_kernel", None) for layer in layers(llm).values()],
            "kvcompress_modules": sorted(m for m in sys.modules if m.startswith("kvcompress"))}


def task_teacher_forced(llm, task) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress.integrations.vllm.measure import positions

    ids = report_ids(llm, task["tokens"])
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=task["top_k"], flat_logprobs=True,
                            detokenize=False)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return {"positions": [[p.top1, list(p.logprobs.items())] for p in positions(out.prompt_logprobs)]}


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0, logprobs=0,
                            flat_logprobs=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids), "logprobs": list(o.outputs[0].logprobs.logprobs),
             "cached": o.num_cached_tokens} for o in outs]


def task_generate(llm, task) -> dict:
    """`mode` "solo": one request at a time, prefix cache emptied before each; "batch": all at once."""
    prompts = [report_ids(llm, n, offset) for n, offset in task["prompts"]]
    preemptions = _count_preemptions(llm)
    if task["mode"] == "solo":
        results = []
        for prompt in prompts:
            llm.reset_prefix_cache()
            results += _generate(llm, [prompt], task["max_tokens"])
    else:
        llm.reset_prefix_cache()
        results = _generate(llm, prompts, task["max_tokens"])
    return {"results": results, "preemptions": preemptions()}


def _count_preemptions(llm):
    """Count the scheduler's preemptions from now on (wraps its `_preempt_request`); returns a reader."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    count = [0]
    original = scheduler._preempt_request

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counted
    return lambda: count[0]


def task_prefix(llm, task) -> dict:
    """B alone (cold), then A (shares B's first `shared` tokens) and B, then B again."""
    b = report_ids(llm, task["length"])
    a = b[:task["shared"]] + report_ids(llm, task["length"] - task["shared"], offset=5000)
    llm.reset_prefix_cache()
    cold = _generate(llm, [b], task["max_tokens"])[0]
    llm.reset_prefix_cache()
    _generate(llm, [a], task["max_tokens"])
    after_a = _generate(llm, [b], task["max_tokens"])[0]
    again = _generate(llm, [b], task["max_tokens"])[0]
    return {"cold": cold, "after_a": after_a, "again": again}


def _part_bytes(method: str, bits: int, group: int, head_dim: int) -> int:
    """Bytes of one slot part, by hand from the documented layout."""
    scales = 1 if method == "rotated+codebook" else 2 * head_dim // group
    return head_dim * bits // 8 + 2 * scales


def task_capture(llm, task) -> dict:
    """Generate one request while recording layers' inputs and outputs, then check the last decode step
    of each recorded layer against attention computed by hand from the page bytes (float64), the
    step's own token included."""
    from by_hand import manual_slot_part

    ctx = layers(llm)
    names = [name for name in ctx if any(f".{i}." in name for i in task["layers"])]
    records = {name: {"writes": [], "forwards": []} for name in names}
    for name in names:
        impl = ctx[name].impl
        forward, update = impl.forward, impl.do_kv_cache_update

        def recording_update(layer, key, value, kv_cache, slot_mapping, _update=update, _rec=records[name]):
            n = slot_mapping.shape[0]
            _rec["writes"].append((key[:n].clone(), value[:n].clone(), slot_mapping.clone()))
            return _update(layer, key, value, kv_cache, slot_mapping)

        def recording_forward(layer, query, key, value, kv_cache, md, output, *args, _forward=forward,
                              _rec=records[name], **kwargs):
            result = _forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
            if md is not None:
                n = md.num_actual_tokens
                _rec["forwards"].append({"query": query[:n].clone(), "output": result[:n].clone(),
                                         "block_table": md.block_table.clone(), "seq_lens": md.seq_lens.clone(),
                                         "qsl": md.query_start_loc.clone()})
            return result

        impl.forward, impl.do_kv_cache_update = recording_forward, recording_update
    llm.reset_prefix_cache()
    _generate(llm, [report_ids(llm, task["prompt"], offset=300)], task["max_tokens"])
    spec = task["spec"]  # {"method", "bits", "group"} of K and V (the same for both in these tests)
    centroids = None
    if spec["method"] == "rotated+codebook":
        from kvcompress.codecs.lloyd_max import gaussian_codebook

        centroids = gaussian_codebook(spec["bits"])
    out = {}
    for name in names:
        layer, rec = ctx[name], records[name]
        pages = layer.kv_cache.view(torch.uint8)  # (blocks, H, block_size, slot_bytes)
        _, heads, block_size, _ = pages.shape
        head_dim = rec["writes"][0][0].shape[-1]
        rotation = None
        if spec["method"] == "rotated+codebook":
            from kvcompress.codecs.rotation import layer_seed, randomized_hadamard_matrix

            rotation = randomized_hadamard_matrix(head_dim, layer_seed(0, int(name.split(".")[2])))
        elif spec["method"] == "hadamard+quant":
            from kvcompress.codecs.hadamard import hadamard_matrix

            rotation = hadamard_matrix(head_dim)
        part = _part_bytes(spec["method"], spec["bits"], spec["group"], head_dim)
        fp = {}  # slot -> (key, value) as handed to the backend, (H, D)
        for key, value, slots in rec["writes"]:
            for i, s in enumerate(slots.tolist()):
                fp[s] = (key[i].double(), value[i].double())
        last = rec["forwards"][-1]
        assert last["query"].shape[0] == 1, "the last step is a decode step"
        stored = int(last["seq_lens"][0])  # this step's token included: it reads its own codes too
        table = last["block_table"][0].tolist()
        slot_of = [table[t // block_size] * block_size + t % block_size for t in range(stored)]

        def by_hand(t, offset):
            row = pages[slot_of[t] // block_size, :, slot_of[t] % block_size]  # (H, slot_bytes)
            return torch.stack([manual_slot_part(bytes(row[h, offset:offset + part].tolist()), spec["method"],
                                                 head_dim, spec["bits"], spec["group"], rotation=rotation,
                                                 centroids=centroids) for h in range(heads)])

        keys = torch.stack([by_hand(t, 0) for t in range(stored)], 1)  # (H, stored, D)
        values = torch.stack([by_hand(t, part) for t in range(stored)], 1)
        fp_keys = torch.stack([fp[slot_of[t]][0] for t in range(stored)], 1)  # (H, stored, D)
        fp_values = torch.stack([fp[slot_of[t]][1] for t in range(stored)], 1)
        q = last["query"][0].double()  # (Hq, D)

        def attend(k, v):
            rep = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            weights = torch.softmax((k @ q[:, :, None]).squeeze(-1) / math.sqrt(head_dim), dim=-1)
            return (weights[:, None, :] @ v).squeeze(1)  # (Hq, D)

        from_codes, from_fp = attend(keys, values), attend(fp_keys, fp_values)
        got = last["output"][0].double()
        key_error = (keys - fp_keys).abs().amax().item()
        out[name] = {"stored": stored, "rel_err_codes": ((got - from_codes).norm() / from_codes.norm()).item(),
                     "rel_err_fp": ((got - from_fp).norm() / from_fp.norm()).item(),
                     "codes_vs_fp": ((from_codes - from_fp).norm() / from_fp.norm()).item(),
                     "key_max_error": key_error, "written_tokens": len(fp)}
    return out


def one_row_at_a_time(model) -> int:
    """Make every matrix product of `model` compute one row at a time; the number of products changed.

    vLLM's CPU matrix products round a row differently with 1-3 rows than with more (measured 3e-5 on
    one float32 layer), so a token's K/V differ in the last bits with the batch it came in; a quantizing
    cache turns that into another code wherever a value sits at a rounding boundary. One row at a time,
    a row's product is the same in every batch: what remains is what the plugin controls.
    """
    changed = 0
    for module in model.modules():
        linear = getattr(module, "cpu_linear", None)
        if linear is not None:
            module.cpu_linear = functools.partial(_rows, linear)
            changed += 1
    return changed


def _rows(linear, x, weight, bias):
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([linear(flat[i:i + 1], weight, bias) for i in range(flat.shape[0])])
    return out.reshape(*x.shape[:-1], out.shape[-1])


TASKS = {"info": task_info, "teacher_forced": task_teacher_forced, "generate": task_generate,
         "prefix": task_prefix, "capture": task_capture}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM

    settings = {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True, "seed": 0, **job["engine"]}
    llm = LLM(model=model_folder(), **settings)
    if job.get("one_row_at_a_time") and not sum(llm.apply_model(one_row_at_a_time)):
        raise RuntimeError("no matrix product of the model was found to compute one row at a time")
    results = [TASKS[task["name"]](llm, task) for task in job["tasks"]]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
