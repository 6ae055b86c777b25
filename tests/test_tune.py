"""Tuning: Lagrangian allocation, spec building, search with retries, and resuming from saved measurements."""

import json

import pytest
import torch

from kvcompress.spec import CacheSpec, TensorSpec
from kvcompress.tuning.allocation import allocate, lagrangian_path, spec_from_choice
from kvcompress.tuning.candidates import candidate_settings
from kvcompress.tuning.sensitivity import Sensitivity
from kvcompress.tuning.state import TuneState
from kvcompress.corpus import CorpusSlice
from kvcompress.tuning.tune import TuneError, TuneSettings, tune, tune_allocation

BASE = CacheSpec(window=16, sinks=2, block_size=32)


def synthetic_sensitivity(layer_scale):
    """Quant candidates with bytes of a real layout and costs that grow 4x per bit removed,
    scaled per layer by `layer_scale` (a sensitive layer has a large scale)."""
    settings = candidate_settings(("quant",))
    # none, int8, int4, int3, int2 (bytes per token, fp32 "none" is the largest)
    sizes = torch.tensor([256.0, 72.0, 40.0, 32.0, 24.0], dtype=torch.float64)
    base_cost = torch.tensor([0.0, 1e-6, 4e-3, 1.6e-2, 6.4e-2], dtype=torch.float64)
    scale = torch.tensor(layer_scale, dtype=torch.float64)[:, None]
    cost = {"key": scale * base_cost, "value": scale * base_cost * 0.5}
    nbytes = {"key": sizes.expand(len(layer_scale), -1).clone(), "value": sizes.expand(len(layer_scale), -1).clone()}
    return Sensitivity(settings, cost, nbytes)


def fake_quality(sens):
    """A stand-in for decode-faithful evaluation: KL = total proxy cost, ratio from the bytes."""
    def measure(spec):
        kl, stored = 0.0, 0.0
        for layer in range(sens.num_layers):
            for tensor, tensor_spec in zip(("key", "value"), spec.for_layer(layer)):
                s = sens.settings[tensor].index(tensor_spec)
                kl += sens.cost[tensor][layer, s].item()
                stored += sens.nbytes[tensor][layer, s].item()
        fp16 = 2 * 128 * sens.num_layers
        return {"kl": kl, "ppl_change": kl, "ratio": fp16 / stored}
    return measure


def test_allocate_gives_cheaper_settings_to_less_sensitive_layers():
    sens = synthetic_sensitivity([100.0, 1.0, 0.01])
    choice = allocate(sens.cost["key"], sens.nbytes["key"], lam=1000.0)
    bits = [sens.settings["key"][s].bits for s in choice]
    assert bits[0] > bits[1] > bits[2], bits  # the most sensitive layer keeps the most bits
    # lam 0: everything as cheap as possible; huge lam: everything as faithful as possible
    assert allocate(sens.cost["key"], sens.nbytes["key"], 0.0) == [4, 4, 4]
    assert allocate(sens.cost["key"], sens.nbytes["key"], 1e15) == [0, 0, 0]


def test_lagrangian_path_runs_from_cheapest_to_most_faithful():
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0])
    path = lagrangian_path(sens)
    assert len(path) > 2
    assert [p.nbytes for p in path] == sorted(p.nbytes for p in path)
    assert path[0].key == (4, 4, 4, 4) and path[-1].key == (0, 0, 0, 0)
    # along the Lagrangian path, more bytes never buys more proxy cost
    proxies = [p.proxy for p in path]
    assert all(a >= b - 1e-15 for a, b in zip(proxies, proxies[1:])), proxies


def test_spec_from_choice_groups_layers_and_round_trips(tmp_path):
    settings = candidate_settings(("quant",))
    key = [1, 2, 2, 2, 4, 4]
    value = [2, 2, 2, 3, 3, 0]
    spec = spec_from_choice(key, value, settings, BASE)
    assert spec.key == settings["key"][2] and spec.value == settings["value"][2]  # the most common settings
    assert set(spec.layers) == {"0", "3", "4", "5"}
    path = tmp_path / "spec.json"
    spec.save(path)
    loaded = CacheSpec.from_dict(json.loads(path.read_text()))
    assert loaded == spec
    for layer in range(6):
        assert loaded.for_layer(layer) == (settings["key"][key[layer]], settings["value"][value[layer]])
    loaded.validate_for(num_layers=6, head_dim=64)
    # consecutive equal layers are one range
    spec = spec_from_choice([2, 2, 3, 3, 3], [2, 2, 2, 2, 2], settings, BASE)
    assert spec.key == settings["key"][3]
    assert spec.layers == {"0-1": {"key": settings["key"][2].to_dict() | {"key_space": "post_rope", "weight": "none",
                                                                           "center": False, "scale_bits": 16}}}


def test_override_under_a_query_weighted_codebook_default_inherits_none_of_its_fields():
    # the codebook family's keys are query-weighted and the centred rotated ones centred: a layer that
    # differs from such a default must be built from its own fields only, whatever the default
    pca = TensorSpec(method="pca+codebook", bits=3, key_space="pre_rope", weight="query")
    centred = TensorSpec(method="rotated+codebook", bits=3, center=True)
    settings = {"key": [pca, TensorSpec(method="quant", bits=8, axis="channel", group_size=32),
                        TensorSpec(method="rotated+codebook", bits=4), centred],
                "value": [TensorSpec(method="quant", bits=4, axis="token", group_size=32)]}
    spec = spec_from_choice([0, 0, 0, 1, 2], [0] * 5, settings, BASE)
    assert spec.key == pca
    assert spec.for_layer(3)[0] == settings["key"][1] and spec.for_layer(4)[0] == settings["key"][2]
    spec = spec_from_choice([3, 3, 3, 2, 0], [0] * 5, settings, BASE)
    assert spec.for_layer(3)[0] == settings["key"][2] and spec.for_layer(4)[0] == pca
    assert CacheSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).for_layer(3)[0] == settings["key"][2]
    # a one-byte-scale default (the bitsN presets'): a plain rotated codebook layer keeps its fp16 scale
    byte = TensorSpec(method="pca+codebook", bits=3.125, key_space="pre_rope", weight="query", scale_bits=8)
    settings["key"].append(byte)
    spec = spec_from_choice([4, 4, 4, 2, 2], [0] * 5, settings, BASE)
    assert spec.key == byte and spec.for_layer(3)[0] == settings["key"][2]
    assert CacheSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).for_layer(4)[0].scale_bits == 16


def test_override_of_a_pre_rope_default_keeps_its_own_key_space():
    settings = {"key": [TensorSpec(method="lowrank+quant", rank=32, bits=4, axis="token", group_size=16,
                                   key_space="pre_rope"),
                        TensorSpec(method="quant", bits=4, axis="channel", group_size=32)],
                "value": [TensorSpec(method="quant", bits=4, axis="token", group_size=32)]}
    spec = spec_from_choice([0, 0, 1], [0, 0, 0], settings, BASE)
    assert spec.for_layer(2)[0].key_space == "post_rope"
    assert CacheSpec.from_dict(spec.to_dict()).for_layer(2)[0] == settings["key"][1]


def test_search_returns_the_most_compressed_point_that_meets_the_target():
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0])
    measure = fake_quality(sens)
    result = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=measure)
    assert result.verified["kl"] <= 0.02
    path = lagrangian_path(sens)
    index = result.attempts[-1]["index"]
    assert index == 0 or measure(spec_from_choice(path[index - 1].key, path[index - 1].value, sens.settings,
                                                  BASE))["kl"] > 0.02
    assert len(result.searched) <= 2 + len(path).bit_length()  # bisection, not a scan


def test_a_missed_verification_tightens_and_retries():
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0])
    measure = fake_quality(sens)
    calls = []

    def verify(spec):  # held-out text is 3x harder than the tuning text
        figures = dict(measure(spec))
        figures["kl"] *= 3.0
        calls.append(figures["kl"])
        return figures

    result = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=verify, max_tries=5)
    assert calls[0] > 0.02  # the first choice missed on held-out text ...
    assert not result.attempts[0]["met"] and result.attempts[-1]["met"]
    assert result.attempts[1]["internal_target"] < result.attempts[0]["internal_target"]  # ... so it tightened
    assert result.verified["kl"] <= 0.02  # and the spec returned meets the target
    assert result.attempts[-1]["index"] > result.attempts[0]["index"]


def test_gives_up_instead_of_returning_a_failing_spec():
    sens = synthetic_sensitivity([10.0, 1.0])
    measure = fake_quality(sens)

    def verify(spec):
        return {**measure(spec), "kl": 1.0}

    with pytest.raises(TuneError, match="after 2 tries"):
        tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=verify, max_tries=2)
    with pytest.raises(TuneError, match="cannot be met"):
        tune_allocation(sens, BASE, 1e-30, evaluate=lambda s: {**measure(s), "kl": 1.0}, verify=verify)


def test_tune_resumes_from_saved_measurements(tiny_llama, tmp_path):
    gen = torch.Generator().manual_seed(0)
    tune_ids = torch.randint(3, 128, (1, 96), generator=gen)
    verify_ids = torch.randint(3, 128, (1, 96), generator=gen)
    calls = []
    handle = tiny_llama.register_forward_pre_hook(lambda *_: calls.append(1))
    state = tmp_path / "spec.json.tune-state.json"
    texts = CorpusSlice(tune_ids, None), CorpusSlice(verify_ids, None)
    try:
        first = tune(tiny_llama, *texts, TuneSettings(0.01), base=BASE, state=state)
        n_first = len(calls)
        saved = json.loads(state.read_text())["entries"]
        assert {e["kind"] for e in saved.values()} == {"probe", "tune-eval", "verify-eval"}
        again = tune(tiny_llama, *texts, TuneSettings(0.01), base=BASE, state=state)
        assert len(calls) == n_first  # nothing measured again
        assert again.spec == first.spec and again.verified == first.verified
        # other text: the saved measurements do not apply
        tune(tiny_llama, CorpusSlice(tune_ids[:, :80], None), texts[1], TuneSettings(0.01), base=BASE, state=state)
        assert len(calls) > n_first
    finally:
        handle.remove()
    assert n_first > 0


def test_tune_cli_is_registered():
    from kvcompress.cli.main import build_parser

    args = build_parser().parse_args(["tune", "--max-kl", "0.01", "--out", "x.json"])
    assert args.max_kl == 0.01 and args.max_ppl_change is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--max-kl", "0.01", "--max-ppl-change", "0.01", "--out", "x.json"])


@pytest.mark.parametrize("argv, words", [
    (["--window", "-1"], ["--window -1", "full precision", "--window 0 or more"]),
    (["--sinks", "-2"], ["--sinks -2", "--sinks 0 or more"]),
    (["--block-size", "0"], ["--block-size 0", "--block-size 1 or more"]),
    (["--block-size", "20"], ["--block-size 20", "must divide block_size 20"]),
    (["--window", "5000", "--tokens", "1024"], ["--tokens 1024", "window 5000", "--tokens 5037 or more"]),
    (["--window", "64", "--verify-tokens", "90"], ["--verify-tokens 90", "window 64"]),
], ids=["window-negative", "sinks-negative", "block-zero", "block-not-divisible", "window-over-tokens",
        "window-over-verify-tokens"])
def test_tune_window_and_block_options_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, argv,
                                                                           words):
    """A bad --window (or --sinks, --block-size) is one line naming it, exit 2, before any model loads."""
    import kvcompress.cli.tune as tune_cli
    from test_reliability import assert_one_line_error, run_main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(tune_cli, "load_model_from_args", no_model)
    status, err = run_main(capsys, "tune", "--max-kl", "0.01", "--out", str(tmp_path / "t.json"), *argv)
    assert status == 2, err
    assert_one_line_error(err, "tune", *words)
    assert not list(tmp_path.iterdir())


def test_state_file_that_is_not_json_is_an_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        TuneState(path)


def test_tensor_weights_rescale_k_and_v_to_the_measured_kl():
    from kvcompress.tuning.sensitivity import calibrate_tensor_weights

    sens = synthetic_sensitivity([1.0, 2.0])
    measure = fake_quality(sens)

    def evaluate(spec):  # downstream, K errors cost 5x what the proxy says, V errors 0.5x
        figures = dict(measure(spec))
        key_only = spec.value.method == "none"
        figures["kl"] *= 5.0 if key_only else 0.5
        return figures

    weighted, info = calibrate_tensor_weights(sens, BASE, lambda specs: [evaluate(spec) for spec in specs])
    assert info["key"]["setting"]["bits"] == 3 and info["value"]["setting"]["bits"] == 3  # second cheapest
    assert info["key"]["weight"] == pytest.approx(5.0) and info["value"]["weight"] == pytest.approx(0.5)
    assert torch.allclose(weighted.cost["key"], 5.0 * sens.cost["key"])
    assert torch.allclose(weighted.cost["value"], 0.5 * sens.cost["value"])


def test_wide_candidates_halve_the_group_overhead_and_build_codecs():
    settings = candidate_settings(("quant", "wide"))
    wide = [s for s in settings["value"] if s.group_size == 64]
    assert {(s.method, s.bits) for s in wide} == {(m, b) for m in ("quant", "hadamard+quant") for b in (4, 3, 2)}
    assert all(s.axis == "token" for s in wide)
    x = torch.randn(1, 2, 64, 64)
    from kvcompress.cache.build import build_codec
    narrow = build_codec(next(s for s in settings["value"] if s.bits == 2 and s.group_size == 32))
    broad = build_codec(next(s for s in wide if s.method == "quant" and s.bits == 2))
    stored = lambda codec: sum(t.numel() * t.element_size() for t in codec.encode(x).values())  # noqa: E731
    assert stored(broad) < stored(narrow)  # 2 + 0.5 bits per value vs 2 + 1
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_settings(("quant", "huge"))


def test_search_on_quality_that_is_not_monotone_along_the_path():
    """Quality that gets worse at some points as bytes grow: the search still returns only a
    point measured to meet the target, or raises; it never returns one that misses."""
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0])
    path = lagrangian_path(sens)
    measure = fake_quality(sens)
    index_of = {(p.key, p.value): i for i, p in enumerate(path)}
    bumps = {i: 0.5 for i in range(len(path)) if i % 3 == 1}  # every third point is much worse than its neighbours

    def bumpy(spec):
        figures = dict(measure(spec))
        key = tuple(sens.settings["key"].index(spec.for_layer(l)[0]) for l in range(sens.num_layers))
        value = tuple(sens.settings["value"].index(spec.for_layer(l)[1]) for l in range(sens.num_layers))
        figures["kl"] += bumps.get(index_of[(key, value)], 0.0)
        return figures

    kls = [bumpy(spec_from_choice(p.key, p.value, sens.settings, BASE))["kl"] for p in path]
    assert any(a < b for a, b in zip(kls, kls[1:])), "the quality function must not be monotone"
    for target in (0.3, 0.05, 0.02, 0.005):
        try:
            result = tune_allocation(sens, BASE, target, evaluate=bumpy, verify=bumpy)
        except TuneError as err:
            assert not any(kl <= target for kl in kls) or "misses the target" in str(err)
            continue
        assert result.verified["kl"] <= target and result.tuned["kl"] <= target
        assert kls[result.attempts[-1]["index"]] <= target
    # when the most faithful point itself misses, the search says it cannot, instead of guessing
    bumps[len(path) - 1] = 1.0
    with pytest.raises(TuneError, match="most faithful"):
        tune_allocation(sens, BASE, 0.3, evaluate=bumpy, verify=bumpy)


def test_best_uniform_without_sensitivities_returns_the_highest_ratio_that_meets():
    from kvcompress.tuning.tune import best_uniform

    sens = synthetic_sensitivity([1.0, 2.0])
    measure = fake_quality(sens)
    with_sens, tried_sens = best_uniform(sens.settings, BASE, 0.05, measure, sens=sens)
    without, tried_all = best_uniform(sens.settings, BASE, 0.05, measure)
    meeting = [t for t in tried_all if t["kl"] <= 0.05]
    best_ratio = max(t["ratio"] for t in meeting)
    assert measure(without)["ratio"] == best_ratio == measure(with_sens)["ratio"]
    assert measure(without)["kl"] <= 0.05
    assert best_ratio > min(t["ratio"] for t in meeting)  # a wrong pick (e.g. the least compressed) would show
    assert len(tried_sens) < len(tried_all)  # with sizes known, it stops at the first that meets


def test_a_changed_fingerprint_is_measured_again_and_says_why(tiny_llama, tmp_path, monkeypatch, caplog):
    import kvcompress.tuning.state as state_module
    from kvcompress.tuning.evaluators import make_evaluator

    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(0))
    text = {"source": "test", "part": "selection", "tokens": [0, 80]}
    spec = CacheSpec.from_dict({**BASE.to_dict(), "key": {"bits": 4, "axis": "channel"},
                                "value": {"bits": 4, "axis": "token"}})
    path = tmp_path / "state.json"
    calls = []
    handle = tiny_llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        make_evaluator(tiny_llama, ids, "verify-eval", text, TuneState(path))(spec)
        measured = len(calls)
        state = TuneState(path)
        make_evaluator(tiny_llama, ids, "verify-eval", text, state)(spec)
        assert len(calls) == measured and state.hits == 1  # same fingerprint: reused
        real = state_module.environment
        monkeypatch.setattr(state_module, "environment", lambda: {**real(), "torch": "0.0.1"})
        state = TuneState(path)
        with caplog.at_level("WARNING"):
            make_evaluator(tiny_llama, ids, "verify-eval", text, state)(spec)
        assert len(calls) > measured and state.hits == 0
        assert "environment.torch" in caplog.text and "-> 0.0.1" in caplog.text
        assert state.redone and "torch" in state.redone[0]
    finally:
        handle.remove()


def test_tune_refuses_to_verify_on_the_report_part(tiny_llama):
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    report = {"source": "embedded:pydoc_data.topics", "part": "report", "tokens": [0, 96]}
    with pytest.raises(ValueError, match="must not read the 'report' part"):
        tune(tiny_llama, CorpusSlice(ids, None), CorpusSlice(ids, report), TuneSettings(0.01), base=BASE)


def test_codebook_family_offers_the_bits_presets_settings_and_needs_an_artifact(tiny_llama):
    from kvcompress.calibration import needs_artifact
    from kvcompress.presets import load_spec
    from kvcompress.tuning.candidates import uniform_candidates

    settings = candidate_settings(("codebook",))
    for n in (4, 3, 2):
        preset = load_spec(f"bits{n}")
        assert preset.key in settings["key"] and preset.value in settings["value"]
    # keys on calibrated directions, values relative to calibrated rms (one-byte scales): both calibrated
    assert needs_artifact(tiny_llama, settings["key"]) and needs_artifact(tiny_llama, settings["value"][1:])
    specs = uniform_candidates(("codebook",))
    assert [s.name for s in specs] == ["cb4", "cb3", "cb2"]
    assert [(s.key, s.value) for s in specs] == [(load_spec(f"bits{n}").key, load_spec(f"bits{n}").value)
                                                 for n in (4, 3, 2)]


def _harder(measure, factor, calls=None):
    """A verification text `factor` times harder (KL) than the tuning text; appends each KL to `calls`."""
    def verify(spec):
        figures = dict(measure(spec))
        figures["kl"] *= factor
        if calls is not None:
            calls.append(figures["kl"])
        return figures
    return verify


def test_refinement_bisects_on_the_verification_text_towards_more_compression():
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0, 0.5, 2.0])
    measure = fake_quality(sens)
    path = lagrangian_path(sens)
    verify = _harder(measure, 1.3)  # the first try misses and the tightened second one overshoots
    plain = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=verify, max_tries=5, refine=0)
    assert plain.index == plain.attempts[-1]["index"]  # refine 0: the point the tries found
    assert not plain.attempts[0]["met"] and plain.verified["kl"] < 0.5 * 0.02
    calls = []
    refined = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=_harder(measure, 1.3, calls), max_tries=5,
                              refine=3)
    assert refined.attempts == plain.attempts
    assert refined.verified["kl"] <= 0.02 and refined.index < plain.index
    assert refined.verified["ratio"] > plain.verified["ratio"]
    assert len(calls) <= len(plain.attempts) + 3  # the budget bounds the extra verifications
    held = {p["index"]: p for p in refined.verified_points}
    assert held[refined.index]["met"] and len(held) == len(calls)
    # what it returns is the most compressed point measured to meet
    assert refined.index == min(i for i, p in held.items() if p["met"])
    # with budget enough, it ends next to a point that misses (or within the byte tolerance)
    full = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=_harder(measure, 3.0), max_tries=5, refine=20)
    misses = [i for i, p in ((p["index"], p) for p in full.verified_points) if not p["met"] and i < full.index]
    assert misses and (full.index - max(misses) <= 1
                       or path[full.index].nbytes <= path[max(misses)].nbytes * 1.01)


def test_refinement_after_a_first_try_with_room_searches_a_looser_target():
    sens = synthetic_sensitivity([10.0, 1.0, 0.1, 3.0, 0.5, 2.0])
    measure = fake_quality(sens)
    easier = _harder(measure, 0.4)  # the verification text is easier than the tuning text
    plain = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=easier, refine=0)
    refined = tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=easier, refine=3)
    assert plain.attempts[0]["met"] and refined.attempts == plain.attempts
    assert refined.index < plain.index and refined.verified["kl"] <= 0.02
    assert refined.verified["ratio"] > plain.verified["ratio"]
    with pytest.raises(ValueError, match="refine"):
        tune_allocation(sens, BASE, 0.02, evaluate=measure, verify=easier, refine=-1)
    with pytest.raises(ValueError, match="refine"):
        TuneSettings(0.01, refine=-1)


def test_codebook_fine_family_fills_the_widths_between_the_bits_presets():
    from kvcompress.tuning.candidates import uniform_candidates

    coarse = candidate_settings(("codebook",))
    both = candidate_settings(("codebook", "codebook-fine"))
    for tensor in ("key", "value"):
        fine = [s for s in both[tensor] if s not in coarse[tensor]]
        assert sorted(s.bits for s in fine) == [2.625, 3.375, 3.625]
        assert all(s.scale_bits == 8 and s.method == coarse[tensor][1].method for s in fine)
    assert [s.name for s in uniform_candidates(("codebook-fine",))] == ["cb3.75", "cb3.5", "cb2.75"]
