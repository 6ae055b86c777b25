"""Ray: a distributed sweep writes what a serial one writes; a dead worker loses no finished record;
`generate --ray` gives the in-process text; a missing Ray is one line naming the extra.

The cluster is local (2 CPUs, no dashboard), started once for the module and shut down after.
Workers build the tiny Llama themselves (`tiny_loader`), as they would load a real model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
from torch import no_grad as torch_no_grad

from kvcompress.cli.main import main
from kvcompress.distributed import RayExecutor, RayOptions, WorkersLostError, WorkerStartError, run_on_actors
from kvcompress.experiments.grid import load_grid
from kvcompress.experiments.records import BASELINE_FILE, record_path
from kvcompress.experiments.settings import SweepSettings
from kvcompress.experiments.sweep import run_sweep
from kvcompress.generate import GenerateSettings, generate_file
from tiny_loader import tiny_llama_loader
from tiny_workers import Doubler

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SETTINGS = SweepSettings(eval_tokens=80, recon_tokens=72, tasks=("agreement",), agreement_prompts=2,
                         agreement_prompt_tokens=24, agreement_new_tokens=4)
OPTIONS = RayOptions(workers=2, cpus_per_worker=1)


def on_ray(options: RayOptions = OPTIONS, model=None) -> RayExecutor:
    """Ray actors that build the tiny Llama themselves, checked against `model` if given."""
    return RayExecutor(options, loader=tiny_llama_loader, load_args="tiny", model=model)


def quant(bits: int, name: str) -> dict:
    return {"label": name, "spec": {"key": {"bits": bits, "axis": "channel", "group_size": 32},
                                    "value": {"bits": bits, "axis": "token", "group_size": 32},
                                    "window": 16, "sinks": 4, "block_size": 32}}


def entries(*bits_names):
    return load_grid({"specs": [quant(b, n) for b, n in bits_names]})


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'kvcompress[ray]'")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    # Workers inherit the environment of the cluster started here: our sources and the test helpers.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _figures(record: dict) -> dict:
    """The measured numbers of a record, flattened to {path: value}."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "seconds" not in prefix:
            out[prefix] = value  # times differ between runs; every measured figure must not

    walk("reconstruction", record["reconstruction"])
    walk("eval", record["eval"])
    walk("tasks", record["tasks"])
    return out


def test_distributed_sweep_writes_the_same_records_as_a_serial_one(tmp_path, ray):
    specs = entries((8, "a"), (4, "b"), (2, "c"))
    model, tokenizer = tiny_llama_loader(None)
    serial = run_sweep(specs, tmp_path / "serial", SETTINGS, model=model, tokenizer=tokenizer, progress=False)
    arrived = []
    spread = run_sweep(specs, tmp_path / "ray", SETTINGS, model=model, tokenizer=tokenizer,
                       executor=on_ray(model=model), progress=False, on_record=lambda r: arrived.append(r["label"]))
    assert sorted(arrived) == ["a", "b", "c"]
    assert [r["label"] for r in spread] == ["a", "b", "c"]
    for one, other in zip(serial, spread):
        assert other["status"] == "ok" and other["key"] == one["key"]
        on_disk = json.loads(record_path(tmp_path / "ray", other["label"]).read_text())
        assert on_disk == other
        assert {k: v for k, v in other.items() if k not in ("reconstruction", "eval", "tasks", "timing", "seconds")} \
            == {k: v for k, v in one.items() if k not in ("reconstruction", "eval", "tasks", "timing", "seconds")}
        mine, theirs = _figures(one), _figures(other)
        assert mine.keys() == theirs.keys() and "eval.kl" in mine and "tasks.agreement.mean_prefix" in mine
        worst = max(mine, key=lambda k: abs(mine[k] - theirs[k]))
        assert abs(mine[worst] - theirs[worst]) <= 1e-6, f"{other['label']} {worst}: {mine[worst]} vs {theirs[worst]}"
    assert serial[0]["eval"]["kl"] < serial[2]["eval"]["kl"]  # real measurements: 2 bits cost more than 8
    base = [json.loads((tmp_path / d / BASELINE_FILE).read_text()) for d in ("serial", "ray")]
    assert base[0]["agreement_continuations"] == base[1]["agreement_continuations"]
    # A rerun, distributed or not, has nothing left to measure.
    again = []
    run_sweep(specs, tmp_path / "ray", SETTINGS, model=model, tokenizer=tokenizer, executor=on_ray(),
              on_record=lambda r: again.append(r))
    assert again == []


def test_a_killed_worker_loses_no_finished_record_and_the_rerun_completes(tmp_path, ray):
    specs = entries((8, "a"), (2, "b"))
    settings = SweepSettings(eval_tokens=80, recon_tokens=72)
    finished, killed = {}, []

    def kill_workers_after_the_first_record(record):
        finished[record["label"]] = record_path(tmp_path, record["label"]).read_bytes()
        if not killed:
            names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()]
            for name in names:
                if name.startswith("kvcompress-"):
                    ray.kill(ray.get_actor(name))
                    killed.append(name)

    model, tokenizer = tiny_llama_loader(None)
    with pytest.raises(WorkersLostError, match="run the same command again"):
        run_sweep(specs, tmp_path, settings, model=model, tokenizer=tokenizer,
                  executor=on_ray(RayOptions(workers=1, retries=0)), on_record=kill_workers_after_the_first_record,
                  progress=False)
    assert killed, "the sweep's workers are named actors"
    missing = [e.label for e in specs if not record_path(tmp_path, e.label).exists()]
    assert missing, "a unit on a killed worker is lost with retries=0"
    assert set(finished) == {e.label for e in specs} - set(missing)
    # The rerun (serial here: a distributed run resumes either way) measures only what is missing.
    measured = []
    records = run_sweep(specs, tmp_path, settings, model=model, tokenizer=tokenizer,
                        on_record=lambda r: measured.append(r["label"]), progress=False)
    assert sorted(measured) == sorted(missing)
    assert [r["status"] for r in records] == ["ok"] * 2
    for label, data in finished.items():
        assert record_path(tmp_path, label).read_bytes() == data, f"record {label} was rewritten"


def test_a_unit_whose_worker_died_goes_to_a_fresh_worker(ray):
    results, killed = {}, []

    def kill_the_pool_once(index, result):
        results[index] = result
        if not killed:
            for name in ray.util.list_named_actors():
                if name.startswith("doubler-"):
                    ray.kill(ray.get_actor(name))
                    killed.append(name)

    # Both actors are killed at once, and a kill lands asynchronously: a unit can be handed to the one
    # and then to the other before either is gone (two deaths), so two retries make the run certain;
    # the third attempt goes to a fresh worker.
    lost = run_on_actors(Doubler, (), "work", [1, 2, 3, 4], kill_the_pool_once, RayOptions(workers=2, retries=2),
                         name="doubler")
    assert killed and lost == [] and results == {0: 2, 1: 4, 2: 6, 3: 8}
    with pytest.raises(WorkerStartError, match="no such model"):
        run_on_actors(Doubler, (True,), "work", [1], lambda i, r: None, RayOptions(workers=1))


class Spy:
    """An executor that records the units it is given and passes them on."""

    def __init__(self, executor):
        self.executor, self.units = executor, []

    def map(self, job, units, on_result):
        self.units += [(type(job).__name__, unit) for unit in units]
        self.executor.map(job, units, on_result)


def forward_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_measure_presets_candidates_on_ray_are_saved_as_a_serial_sweep_saves_them_prompt_protocol_too(tmp_path, ray):
    from kvcompress.corpus import corpus_slice
    from kvcompress.fingerprint import text_fingerprint
    from kvcompress.spec import CacheSpec, EvictionSpec
    from kvcompress.tuning.evaluators import make_evaluator
    from kvcompress.tuning.preset_selection import SWEEP_KIND
    from kvcompress.tuning.state import TuneState

    candidates = [CacheSpec.from_dict({**quant(b, f"q{b}")["spec"], "name": f"q{b}"}) for b in (8, 4, 2)]
    model, tokenizer = tiny_llama_loader(None)
    text = corpus_slice(tokenizer, part="calibration", n_tokens=96, offset=0)
    ids = text.ids
    text_fp = text_fingerprint(ids, text.record)
    serial = TuneState(tmp_path / "serial.json")
    make_evaluator(model, ids, SWEEP_KIND, text_fp, serial).map(candidates)
    spread = TuneState(tmp_path / "ray.json")
    here = forward_calls(model)
    arrived = []
    make_evaluator(model, ids, SWEEP_KIND, text_fp, spread, executor=on_ray(model=model)).map(
        candidates, on_new=lambda spec, figures: arrived.append(spec.name))
    assert here == [], "measured on the Ray workers, not here"
    assert sorted(arrived) == ["q2", "q4", "q8"] and set(spread.entries) == set(serial.entries)
    for key, entry in serial.entries.items():
        mine, theirs = entry["result"], spread.entries[key]["result"]
        assert {k: v for k, v in entry.items() if k != "result"} == \
            {k: v for k, v in spread.entries[key].items() if k != "result"}
        for name in ("kl", "ppl_change", "top1", "ratio", "stored_bytes"):
            assert abs(mine[name] - theirs[name]) <= 1e-6, f"{entry['spec']} {name}: {mine[name]} vs {theirs[name]}"
    kls = [serial.entries[k]["result"]["kl"] for k in serial.entries]
    assert min(kls) < max(kls)  # real measurements: 2 bits cost more than 8
    # Saved as they arrive (a rerun, serial or not, finds them all).
    again = Spy(on_ray())
    make_evaluator(model, ids, SWEEP_KIND, text_fp, TuneState(tmp_path / "ray.json"), executor=again).map(candidates)
    assert again.units == []
    # The prompt protocol (an evicting candidate, 64 context tokens) runs on Ray too, with the same figures.
    evicting = dataclasses.replace(candidates[1], name="q4-tova", eviction=EvictionSpec(policy="tova", keep=0.5))
    local = make_evaluator(model, ids, SWEEP_KIND, text_fp, TuneState(None), context=64)(evicting)
    remote, = make_evaluator(model, ids, SWEEP_KIND, text_fp, TuneState(None), context=64,
                             executor=on_ray(RayOptions(workers=1), model=model)).map([evicting])
    assert local["evicted_tokens"] > 0 and local["context_tokens"] == 64
    for name in ("kl", "ppl_change", "ratio", "whole_cache_ratio", "evicted_tokens"):
        assert abs(local[name] - remote[name]) <= 1e-6, f"{name}: {local[name]} vs {remote[name]}"


def test_a_worker_that_loads_another_model_is_refused(ray):
    from kvcompress.tuning.evaluators import EvalJob

    other, _ = tiny_llama_loader(None)
    with torch_no_grad():
        next(other.parameters()).add_(1.0)  # other weights: another fingerprint
    with pytest.raises(WorkerStartError, match="another model than the caller"):
        on_ray(RayOptions(workers=1), model=other).map(EvalJob(None), ["unit"], lambda i, r: None)


def test_tune_on_ray_saves_the_sensitivity_a_serial_tune_measures(tmp_path, ray):
    import torch

    from kvcompress.spec import CacheSpec
    from kvcompress.tuning.state import TuneState
    from kvcompress.corpus import CorpusSlice
    from kvcompress.tuning.tune import TuneSettings, tune

    model, _ = tiny_llama_loader(None)
    gen = torch.Generator().manual_seed(0)
    tune_ids = torch.randint(3, 128, (1, 96), generator=gen)
    verify_ids = torch.randint(3, 128, (1, 96), generator=gen)
    base = CacheSpec(window=16, sinks=2, block_size=32)
    serial = TuneState(tmp_path / "serial.json")
    texts = CorpusSlice(tune_ids, None), CorpusSlice(verify_ids, None)
    expected = tune(model, *texts, TuneSettings(0.01), base=base, state=serial)
    spread = TuneState(tmp_path / "ray.json")
    executor = Spy(on_ray(model=model))
    result = tune(model, *texts, TuneSettings(0.01), base=base, state=spread, executor=executor)
    assert set(spread.entries) == set(serial.entries)  # same kinds, fingerprints and specs
    kinds = {entry["kind"] for entry in spread.entries.values()}
    assert kinds == {"probe", "tune-eval", "verify-eval"}
    probes = [e for e in serial.entries.values() if e["kind"] == "probe"]
    assert len(probes) == max(len(expected.sens.settings[t]) for t in ("key", "value"))
    # The probes and the two weight evaluations went to Ray; the search and verification ran here.
    jobs = [name for name, _ in executor.units]
    assert jobs == ["ProbeJob"] * len(probes) + ["EvalJob"] * 2
    for key, entry in serial.entries.items():
        mine, theirs = entry["result"], spread.entries[key]["result"]
        names = [n for n in mine if n.endswith(("_cost", "_bytes"))] or ["kl", "ppl_change", "ratio", "stored_bytes"]
        for name in names:
            a, b = torch.tensor(mine[name], dtype=torch.float64), torch.tensor(theirs[name], dtype=torch.float64)
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{entry['kind']} {entry['spec']} {name}: {a} vs {b}"
    for tensor in ("key", "value"):
        assert torch.allclose(result.sens.cost[tensor], expected.sens.cost[tensor], rtol=0, atol=1e-6)
        assert torch.equal(result.sens.nbytes[tensor], expected.sens.nbytes[tensor])
    costs = expected.sens.cost["key"]
    assert costs.max() > costs.min()  # real measurements: settings differ
    for tensor, info in expected.tensor_weights.items():
        assert result.tensor_weights[tensor]["setting"] == info["setting"]
        assert result.tensor_weights[tensor]["weight"] == pytest.approx(info["weight"], rel=1e-3)
    assert result.spec == expected.spec


def _write_prompts(path: Path) -> None:
    lines = [json.dumps({"id": "p1", "prompt": "the quick brown fox jumps over"}),
             json.dumps({"id": "p2", "prompt": "a different prompt about lazy dogs and"}),
             "{not json",
             json.dumps({"id": "long", "prompt": "x" * 1100}),  # the tiny model's context is 1024
             "",
             json.dumps({"prompt": "no id, so the line number is its id"})]
    path.write_text("\n".join(lines) + "\n")


def _lines(path: Path) -> tuple[dict, dict, list]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    ok = {r["id"]: r for r in rows if r.get("status") == "ok"}
    errors = {r["id"]: r for r in rows if r.get("status") == "error"}
    return ok, errors, [r["summary"] for r in rows if "summary" in r]


def test_generate_on_ray_gives_the_in_process_text_and_names_bad_lines(tmp_path, ray):
    import torch

    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts)
    settings = GenerateSettings(spec="int8", max_new_tokens=12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (1 CPU each)
    try:
        local = generate_file(prompts, tmp_path / "local.jsonl", settings, loader=tiny_llama_loader)
    finally:
        torch.set_num_threads(threads)
    remote = generate_file(prompts, tmp_path / "ray.jsonl", settings,  # one actor: each start costs seconds on CI
                           executor=RayExecutor(RayOptions(workers=1), settings, loader=tiny_llama_loader))
    local_ok, local_errors, _ = _lines(tmp_path / "local.jsonl")
    ray_ok, ray_errors, summaries = _lines(tmp_path / "ray.jsonl")
    assert sorted(ray_ok) == sorted(local_ok) == ["line-6", "p1", "p2"]
    for pid in local_ok:
        assert ray_ok[pid]["text"] == local_ok[pid]["text"] and ray_ok[pid]["new_tokens"] == 12
        assert ray_ok[pid]["stored_bytes"] == local_ok[pid]["stored_bytes"]
        line = ray_ok[pid]
        assert line["stored_bytes"] > 0 and line["ratio"] == round(line["fp16_bytes"] / line["stored_bytes"], 4)
    assert sorted(ray_errors) == sorted(local_errors) == ["line-3", "long"]
    assert ray_errors["line-3"]["error"].startswith(f"{prompts}:3: not valid JSON")
    assert "line 4" in ray_errors["long"]["error"] and "context of 1024" in ray_errors["long"]["error"]
    assert summaries == [remote] and remote["ok"] == 3 and remote["errors"] == 2 and local["ok"] == 3
    assert remote["stored_bytes"] == sum(r["stored_bytes"] for r in ray_ok.values())

    # Resume: finished ids are skipped, the failed ones are tried again (and fail again).
    again = generate_file(prompts, tmp_path / "ray.jsonl", settings, loader=tiny_llama_loader)
    assert again["skipped"] == 3 and again["ok"] == 0 and again["errors"] == 2


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as if not installed
    code = main(["sweep", "--specs", "int8", "--out", str(tmp_path / "s"), "--ray"])
    err = capsys.readouterr().err
    assert code == 2
    assert "kvcompress[ray]" in err and "--ray" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists(), "nothing starts before the missing extra is reported"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code = main(["generate", "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--ray", "auto"])
    assert code == 2 and "kvcompress[ray]" in capsys.readouterr().err
    code = main(["measure-presets", "--file", str(tmp_path / "presets.json"), "--ray"])
    assert code == 2 and "kvcompress[ray]" in capsys.readouterr().err and not (tmp_path / "presets.json").exists()
    code = main(["tune", "--max-kl", "0.01", "--out", str(tmp_path / "tuned.json"), "--ray"])
    err = capsys.readouterr().err
    assert code == 2 and "kvcompress[ray]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tuned.json").exists()
