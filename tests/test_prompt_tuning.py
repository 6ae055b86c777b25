"""Tuning and preset choice under the prompt protocol: candidates crossed with windows and
eviction, evaluators that run `prompt_eval`, the whole-cache ratio of another dtype, the choice by
compression floor, and the shipped prompt presets."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch

from kvcompress import CompressedCache, enable_fast_attention
from kvcompress.cli.main import main
from kvcompress.corpus import CorpusSlice
from kvcompress.measure.prompt import prompt_eval
from kvcompress.presets import PRESETS
from kvcompress.presets.measured import PROMPT_DATA_FILE, load_measured, markdown_table, register_measured
from kvcompress.spec import CacheSpec, EvictionSpec
from kvcompress.tuning.candidates import eviction_grid, uniform_candidates
from kvcompress.tuning.evaluators import make_evaluator, make_ratio_evaluator
from kvcompress.tuning.preset_selection import (choose_by_floor, geometric_mean_kl, parse_floors, select_prompt_presets,
                                                worst_reference_ratio)
from kvcompress.tuning.state import TuneState
from kvcompress.tuning.tune import TuneError, TuneResult, TuneSettings, tune, tune_grid

CONTEXT, TOKENS = 100, 45
BASE = CacheSpec(window=16, sinks=2, block_size=32)


def text_ids(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- candidates


def test_candidates_cross_codecs_with_windows_and_eviction():
    grid = eviction_grid(["tova", "expected"], [0.5, 1])
    assert grid == [EvictionSpec(policy="tova", keep=0.5), EvictionSpec(policy="expected", keep=0.5), None]
    specs = uniform_candidates(["none", "quant"], windows=[32, 64], evictions=grid, only=["full", "k4v4"])
    names = [s.name for s in specs]
    assert names == ["full-w32-tova50", "full-w32-expected50", "full-w64-tova50", "full-w64-expected50",
                     "k4v4-w32-tova50", "k4v4-w32-expected50", "k4v4-w32-all",
                     "k4v4-w64-tova50", "k4v4-w64-expected50", "k4v4-w64-all"]  # no "full" without eviction
    by_name = {s.name: s for s in specs}
    assert by_name["k4v4-w64-expected50"].window == 64
    assert by_name["k4v4-w64-expected50"].eviction == EvictionSpec(policy="expected", keep=0.5)
    assert by_name["k4v4-w32-all"].eviction is None and by_name["k4v4-w32-all"].key.bits == 4
    # without windows or evictions: the names and specs of before
    assert [s.name for s in uniform_candidates(["quant"], only=["k4v4"])] == ["k4v4"]


@pytest.mark.parametrize("call, message", [
    (lambda: eviction_grid(["nope"], [0.5]), "allowed"),
    (lambda: eviction_grid(["tova"], [1.5]), r"\(0, 1\]"),
    (lambda: uniform_candidates(["quant"], only=["cb3"]), "k4v4"),  # the names the families do have
])
def test_bad_grid_values_name_the_allowed_ones(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- evaluators


def test_prompt_evaluator_measures_the_prompt_protocol_once(tiny_llama, tmp_path):
    ids = text_ids(CONTEXT + TOKENS + 1)
    spec = dataclasses.replace(BASE, name="x", eviction=EvictionSpec(policy="tova", keep=0.5),
                               key=uniform_candidates(["quant"], only=["k4v4"])[0].key)
    state = TuneState(tmp_path / "state.json")
    evaluate = make_evaluator(tiny_llama, ids, "verify-eval", {"name": "t"}, state, context=CONTEXT)
    figures = evaluate(spec)
    direct = prompt_eval(tiny_llama, ids, spec, CONTEXT, progress=False)
    assert figures["kl"] == pytest.approx(direct.kl, rel=1e-6)
    assert figures["ratio"] == figures["whole_cache_ratio"] == pytest.approx(direct.whole_cache_ratio)
    assert figures["evicted_tokens"] > 0 and figures["context_tokens"] == CONTEXT
    assert evaluate(spec) == figures and state.hits == 1
    # another context is another measurement, not the saved one
    other = make_evaluator(tiny_llama, ids, "verify-eval", {"name": "t"}, state, context=CONTEXT - 8)(spec)
    assert state.hits == 1 and other["kl"] != figures["kl"]


def test_ratio_evaluator_is_the_memory_report_of_a_cache_of_that_dtype(tiny_llama, tmp_path):
    ids = text_ids(CONTEXT + 1)
    spec = dataclasses.replace(BASE, eviction=EvictionSpec(policy="snapkv", keep=0.5))
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)  # a bfloat16 copy of the tiny model
    state = TuneState(None)
    sizes = make_ratio_evaluator(model, ids, {"name": "t"}, state, CONTEXT)(spec)
    cache = CompressedCache(model, spec)
    with torch.no_grad(), enable_fast_attention(model, strict=False):
        model(input_ids=ids[:, :CONTEXT], cache=cache)
    report = cache.memory_report()
    assert (sizes["stored_bytes"], sizes["fp16_bytes"]) == (report.stored_bytes, report.fp16_bytes)
    assert sizes["ratio"] == pytest.approx(report.ratio)
    assert sizes["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    # the same spec stores its full-precision window in float32 on the float32 model: a smaller ratio
    fp32 = make_ratio_evaluator(tiny_llama, ids, {"name": "t"}, state, CONTEXT)(spec)
    assert fp32["ratio"] < sizes["ratio"]
    assert model.config._attn_implementation == "sdpa"  # put back after the prefill


# --------------------------------------------------------------------------- choice by compression floor


def test_choose_by_floor_takes_the_lowest_kl_that_meets_each_floor():
    ratios = {"a": {"ratio": 5.5}, "b": {"ratio": 6.2}, "c": {"ratio": 7.0}, "d": {"ratio": 8.4}}
    kl = {"a": 0.001, "b": 0.02, "c": 0.01, "d": 0.05}
    calls = []

    def measure(name):
        calls.append(name)
        return {"kl": kl[name]}

    chosen = choose_by_floor({"six": 6, "eight": 8}, ratios, measure)
    assert chosen["six"]["candidate"] == "c"  # a is better but stores too much; c beats b
    assert chosen["six"]["ranked"] == [["c", 0.01], ["b", 0.02], ["d", 0.05]]
    assert chosen["eight"]["candidate"] == "d"
    assert sorted(calls) == ["b", "c", "d"]  # each candidate meeting a floor measured once, "a" never
    with pytest.raises(ValueError, match="no candidate meets preset 'ten'.*8.40x"):
        choose_by_floor({"ten": 10}, ratios, measure)


def test_choose_by_floor_by_another_objective_breaks_ties_by_kl():
    ratios = {"a": {"ratio": 6.5}, "b": {"ratio": 6.2}, "c": {"ratio": 7.0}}
    figures = {"a": {"kl": 0.01, "worst": 0.9}, "b": {"kl": 0.02, "worst": 0.6}, "c": {"kl": 0.005, "worst": 0.6}}
    chosen = choose_by_floor({"six": 6}, ratios, figures.get, "worst")
    assert chosen["six"]["candidate"] == "c"  # b and c tie on the objective; c has the lower KL
    assert chosen["six"]["ranked"] == [["c", 0.6], ["b", 0.6], ["a", 0.9]]


def test_worst_reference_ratio_is_the_kind_furthest_from_its_reference():
    by_kind = {"docs": {"kl": 0.006}, "code": {"kl": 0.02}, "plays": {"kl": 0.01}}
    references = {"docs": {"kl": 0.01}, "code": {"kl": 0.05}, "plays": {"kl": 0.04}}
    assert worst_reference_ratio(by_kind, references) == (pytest.approx(0.6), "docs")
    # a lower geometric mean does not win when one kind moves away from its reference
    other = {"docs": {"kl": 0.008}, "code": {"kl": 0.01}, "plays": {"kl": 0.005}}
    assert geometric_mean_kl(other) < geometric_mean_kl(by_kind)
    assert worst_reference_ratio(other, references)[0] > worst_reference_ratio(by_kind, references)[0]


def test_parse_floors():
    assert parse_floors("prompt-6x=6, prompt-8x=8") == {"prompt-6x": 6.0, "prompt-8x": 8.0}
    for bad in ("prompt-6x", "x=1", "=6", ""):
        with pytest.raises(ValueError):
            parse_floors(bad)


class WordIds:
    """A stand-in tokenizer: one small id per word (the tiny model's vocabulary has 128 ids)."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [3 + len(word) % 100 for word in text.split()]}


def test_select_prompt_presets_chooses_on_selection_and_reports_on_the_report_part(tiny_llama):
    candidates = uniform_candidates(["quant"], only=["k4v4", "k2v2"], windows=[16], sinks=2,
                                    evictions=eviction_grid(["tova"], [0.5, 1]))
    data = select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                                 tokens=TOKENS)
    (entry,) = data["presets"]
    meeting = {c["name"]: c for c in data["candidates"] if c["cache"]["ratio"] >= 1.5}
    assert meeting and all("verified" in c for c in meeting.values())
    best = min(meeting, key=lambda n: meeting[n]["verified"]["kl"])
    assert entry["candidate"] == best and entry["cache"]["ratio"] >= 1.5
    assert data["texts"]["verify"]["part"] == "selection" and data["texts"]["report"]["part"] == "report"
    assert data["protocol"]["context_tokens"] == CONTEXT and entry["report"]["tokens"] == TOKENS
    assert entry["report"]["kl"] != entry["verified"]["kl"]  # measured again, on other text
    with pytest.raises(ValueError, match="must not read the 'report' part"):
        select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                              tokens=TOKENS, verify_part="report")


def test_geometric_mean_kl_weighs_every_kind_the_same():
    assert geometric_mean_kl({"a": {"kl": 0.01}, "b": {"kl": 0.04}}) == pytest.approx(0.02)
    # a kind with 10x the KL everywhere does not decide the order of two candidates alone
    one = geometric_mean_kl({"easy": {"kl": 0.001}, "hard": {"kl": 0.05}})
    two = geometric_mean_kl({"easy": {"kl": 0.003}, "hard": {"kl": 0.045}})
    assert one < two


def test_select_prompt_presets_with_kinds_chooses_on_every_kinds_selection_part(tiny_llama, tmp_path, monkeypatch):
    """The ratio is the lowest over the kinds, the KL the geometric mean of each kind's KL on its
    selection part; each kind's figures are those of the one-kind choice; reports on report parts;
    a rerun on the same state measures nothing again (the kinds do not overwrite each other's)."""
    import kvcompress.measure.prompt as protocol

    candidates = uniform_candidates(["quant"], only=["k4v4", "k2v2"], windows=[16], sinks=2,
                                    evictions=eviction_grid(["tova"], [0.5, 1]))
    kinds = ["docs", "code"]
    state = str(tmp_path / "state.json")
    data = select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                                 tokens=TOKENS, kinds=kinds, state=state)

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    with monkeypatch.context() as patch:
        patch.setattr(protocol, "prompt_eval", refuse)
        patch.setattr(protocol, "context_sizes", refuse)
        again = select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates,
                                      context=CONTEXT, tokens=TOKENS, kinds=kinds, state=state)
    assert again["presets"] == data["presets"]
    (entry,) = data["presets"]
    one_kind = {kind: select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates,
                                            context=CONTEXT, tokens=TOKENS, kind=kind) for kind in kinds}
    single = {kind: {c["name"]: c for c in d["candidates"]} for kind, d in one_kind.items()}
    meeting = {c["name"]: c for c in data["candidates"] if c["cache"]["ratio"] >= 1.5}
    assert meeting and all("verified" in c for c in meeting.values())
    for name, c in meeting.items():
        assert c["cache"]["ratio"] == min(single[k][name]["cache"]["ratio"] for k in kinds)
        for kind in kinds:
            if "verified" in single[kind][name]:
                assert c["verified"]["by_kind"][kind]["kl"] == pytest.approx(single[kind][name]["verified"]["kl"])
        kls = [c["verified"]["by_kind"][k]["kl"] for k in kinds]
        assert c["verified"]["kl"] == pytest.approx((kls[0] * kls[1]) ** 0.5)
    assert entry["candidate"] == min(meeting, key=lambda n: meeting[n]["verified"]["kl"])
    assert data["texts"]["verify"]["part"] == "selection" and data["texts"]["report"]["part"] == "report"
    for kind in kinds:
        assert data["texts"]["verify"]["by_kind"][kind]["part"] == "selection"
        assert data["texts"]["verify"]["by_kind"][kind]["kind"] == kind
        assert data["texts"]["report"]["by_kind"][kind]["part"] == "report"
        assert entry["report"]["by_kind"][kind]["tokens"] == TOKENS
    assert set(data["corpus"]["kinds"]) == set(kinds)
    from kvcompress.presets.measured import preset_help

    shown = f"geometric-mean KL of docs, code) text, prompt protocol: KL {entry['report']['kl']:.4f}"
    assert shown in preset_help(entry)


def test_select_prompt_presets_against_references_minimises_the_worst_kinds_ratio(tiny_llama, tmp_path):
    """With references (e.g. kvpress's best KL on each kind's selection part) the choice is the
    candidate whose worst kind is closest to its reference; the report parts are measured only
    when asked; references must cover exactly the kinds."""
    candidates = uniform_candidates(["quant"], only=["k4v4", "k2v2"], windows=[16], sinks=2,
                                    evictions=eviction_grid(["tova", "snapkv"], [0.5, 1]))
    kinds, state = ["docs", "code"], str(tmp_path / "state.json")
    plain = select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                                  tokens=TOKENS, kinds=kinds, state=state)
    meeting = {c["name"]: c["verified"] for c in plain["candidates"] if c["cache"]["ratio"] >= 1.5}
    assert len(meeting) >= 2
    # references that make the geometric-mean choice the worst on one kind
    best = plain["presets"][0]["candidate"]
    references = {k: {"kl": meeting[best]["by_kind"][k]["kl"] * (0.1 if k == "code" else 1.0)} for k in kinds}
    data = select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                                 tokens=TOKENS, kinds=kinds, state=state, references=references, report=False)
    (entry,) = data["presets"]
    worst = {n: worst_reference_ratio(f["by_kind"], references)[0] for n, f in meeting.items()}
    assert entry["candidate"] == min(worst, key=lambda n: (worst[n], meeting[n]["kl"]))
    assert entry["verified"]["worst_reference_ratio"] == pytest.approx(worst[entry["candidate"]])
    assert data["objective"] == "worst_reference_ratio" and data["references"] == references
    assert "report" not in entry and entry["ranked"][0] == [entry["candidate"], pytest.approx(worst[entry["candidate"]])]
    with pytest.raises(ValueError, match="one reference per kind"):
        select_prompt_presets(tiny_llama, WordIds(), {"p": 1.5}, candidates=candidates, context=CONTEXT,
                              tokens=TOKENS, kinds=kinds, state=state, references={"docs": {"kl": 0.1}})


def test_select_presets_with_a_context_runs_the_prompt_protocol(tiny_llama, monkeypatch):
    import kvcompress.tuning.preset_selection as selection

    monkeypatch.setattr(selection, "passkey_score", lambda *a, **k: {"accuracy": 1.0, "by_length": {}, "cases": 0})
    candidates = uniform_candidates(["quant"], only=["k4v4", "k2v2"], windows=[16], sinks=2,
                                    evictions=eviction_grid(["tova"], [0.5]))
    settings = selection.SelectionSettings(sweep_tokens=TOKENS, sweep_offset=0, verify_tokens=TOKENS, context=CONTEXT)
    data = selection.select_presets(tiny_llama, WordIds(), {"loose": 10.0}, candidates=candidates, settings=settings)
    swept = {c["name"]: c["sweep"] for c in data["candidates"]}
    assert all(f["context_tokens"] == CONTEXT and f["evicted_tokens"] > 0 for f in swept.values())
    (entry,) = data["presets"]
    assert entry["candidate"] == max(swept, key=lambda n: swept[n]["ratio"])  # both meet the loose target
    assert entry["report"]["ratio"] == entry["report"]["whole_cache_ratio"]
    assert data["protocol"]["context_tokens"] == CONTEXT
    assert data["texts"]["verify"]["n_tokens"] == CONTEXT + TOKENS + 1


# --------------------------------------------------------------------------- tune under the prompt protocol


def test_tune_with_context_tunes_codecs_for_the_tokens_an_eviction_keeps(tiny_llama, tmp_path):
    tune_ids, verify_ids = text_ids(CONTEXT + TOKENS + 1, 1), text_ids(CONTEXT + TOKENS + 1, 2)
    base = dataclasses.replace(BASE, eviction=EvictionSpec(policy="tova", keep=0.5))
    state = tmp_path / "state.json"
    result = tune(tiny_llama, CorpusSlice(tune_ids, None), CorpusSlice(verify_ids, None),
                  TuneSettings(0.05, weight_tensors=False, context=CONTEXT), base=base, state=state)
    assert result.spec.eviction == base.eviction and result.spec.window == 16
    direct = prompt_eval(tiny_llama, verify_ids, result.spec, CONTEXT, progress=False)
    assert result.verified["kl"] == pytest.approx(direct.kl, rel=1e-6)
    assert result.verified["kl"] <= 0.05
    assert result.verified["ratio"] == pytest.approx(direct.whole_cache_ratio)
    saved = json.loads(state.read_text())["entries"].values()
    assert {e["fingerprint"]["text"]["context"] for e in saved if e["kind"] != "probe"} == {CONTEXT}
    with pytest.raises(ValueError, match="prompt protocol"):
        tune(tiny_llama, CorpusSlice(tune_ids, None), CorpusSlice(verify_ids, None), TuneSettings(0.05), base=base)


def test_tune_grid_keeps_the_verified_result_with_the_highest_ratio(monkeypatch):
    import kvcompress.tuning.tune as module

    ratios = {16: 3.0, 32: None, 64: 2.5}  # window 32 cannot meet the target

    def fake_tune(model, tune_text, verify_text, settings, *, base, **kwargs):
        if ratios[base.window] is None:
            raise TuneError("missed")
        return TuneResult(base, settings.target, "kl", {"kl": 0.01, "ratio": ratios[base.window]}, {})

    monkeypatch.setattr(module, "tune", fake_tune)
    bases = [dataclasses.replace(BASE, window=w) for w in ratios]
    best, rows = tune_grid(None, None, None, TuneSettings(0.02), bases)
    assert best.spec.window == 16
    assert [r["met"] for r in rows] == [True, False, True] and rows[1]["error"] == "missed"
    monkeypatch.setitem(ratios, 16, None)
    monkeypatch.setitem(ratios, 64, None)
    with pytest.raises(TuneError, match="no base spec of the 3"):
        tune_grid(None, None, None, TuneSettings(0.02), bases)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    (["measure-presets", "--keep", "0.5"], "--keep .* add --context"),
    (["measure-presets", "--context", "1536", "--keep", "0.5", "--policies", "nope"], "--policies nope"),
    (["measure-presets", "--min-ratios", "p=6"], "--min-ratios .* --context"),
    (["measure-presets", "--context", "1536", "--min-ratios", "p=1"], "--min-ratios p=1"),
    (["measure-presets", "--context", "100", "--window", "128"], "--context 100 is too few"),
    (["tune", "--max-kl", "0.01", "--out", "x.json", "--keep", "0.5"], "--keep .* add --context"),
    (["tune", "--max-kl", "0.01", "--out", "x.json", "--context", "1536", "--windows", "16,32",
      "--compare-uniform"], "--compare-uniform"),
])
def test_cli_refuses_bad_grids_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


# --------------------------------------------------------------------------- the shipped prompt presets


def test_shipped_prompt_presets_are_the_choice_their_own_figures_imply():
    """For each floor, the preset is the candidate with the lowest selection KL among those whose
    whole cache met the floor; the choice read selection text, the report figures the report part."""
    data = load_measured(PROMPT_DATA_FILE)
    assert [e["name"] for e in data["presets"]] == ["prompt-6x", "prompt-8x"]
    assert data["texts"]["verify"]["part"] == "selection" and data["texts"]["report"]["part"] == "report"
    assert data["protocol"]["context_tokens"] == 1536 and data["protocol"]["continuation_tokens"] == 512
    assert data["model_fingerprint"]["dtype"] == "torch.float32"
    assert data["ratio_model_fingerprint"]["dtype"] == "torch.bfloat16"
    assert data["command"].startswith("python benchmarks/select_prompt_presets.py")
    objective = data.get("objective", "kl")  # "worst_reference_ratio": held against kvpress on each kind
    for entry in data["presets"]:
        meeting = {c["name"]: c for c in data["candidates"] if c["cache"]["ratio"] >= entry["min_ratio"]}
        best = min(meeting, key=lambda n: (meeting[n]["verified"][objective], meeting[n]["verified"]["kl"]))
        assert entry["candidate"] == best, entry["name"]
        assert entry["cache"]["dtype"] == "bfloat16" and entry["cache"]["context_tokens"] == 1536
        assert PRESETS.get(entry["name"]) == CacheSpec.from_dict(entry["spec"])
        assert f">= {entry['min_ratio']:g}x" in PRESETS.help(entry["name"])
    assert "| `prompt-6x` | >= 6x |" in markdown_table(data)


def test_register_prompt_presets_once():
    from kvcompress.presets import Registry

    registry = Registry()
    data = load_measured(PROMPT_DATA_FILE)
    assert register_measured(registry, data) == ["prompt-6x", "prompt-8x"]
    with pytest.raises(ValueError, match="already registered"):
        register_measured(registry, data)


@pytest.mark.real_model
def test_prompt_presets_meet_their_ratio_in_a_bfloat16_cache():
    """A real bfloat16 cache after a 1536-token prompt of report text stores what the preset promises."""
    from kvcompress.corpus import corpus_tokens
    from kvcompress.models import load_model

    model, tokenizer = load_model(dtype=torch.bfloat16)
    ids = corpus_tokens(tokenizer, "report", n_tokens=1536)
    for name in ("prompt-6x", "prompt-8x"):
        spec = PRESETS.get(name)
        cache = CompressedCache(model, spec)
        with torch.no_grad(), enable_fast_attention(model, strict=False):
            model(input_ids=ids, cache=cache, logits_to_keep=1)
        report = cache.memory_report()
        floor = float(name.removeprefix("prompt-").removesuffix("x"))
        assert report.ratio >= floor, f"{name}: whole cache {report.ratio:.2f}x < {floor}x"
        config = model.config
        assert report.fp16_bytes == 2 * config.num_hidden_layers * config.num_key_value_heads * 1536 * 64 * 2


def test_verify_checks_a_prompt_preset_against_its_floor():
    from kvcompress.tuning.preset_selection import verify_presets

    spec = CacheSpec(name="p")
    data = {"presets": [{"name": n, "min_ratio": floor, "spec": spec.to_dict()} for n, floor in (("six", 6), ("ten", 10))]}
    rows = verify_presets(data, lambda s: {"kl": 0.02, "ratio": 7.5, "ppl_change": 0.01})
    assert [(r["name"], r["met"], r["min_ratio"]) for r in rows] == [("six", True, 6), ("ten", False, 10)]
