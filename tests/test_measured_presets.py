"""Presets chosen by measurement: selection logic, the shipped data file, registration, verification."""

import pytest

from kvcompress.presets.measured import load_measured, register_measured
from kvcompress.tuning.preset_selection import (DEFAULT_TARGETS, choose, parse_targets,
                                         uniform_candidates, verify_presets)
from kvcompress.presets import PRESETS, Registry
from kvcompress.spec import CacheSpec


def test_uniform_candidates_are_named_and_valid():
    specs = uniform_candidates(("quant", "hadamard"))
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 19
    for spec in specs:
        spec.validate_for(num_layers=30, head_dim=64)
    with pytest.raises(ValueError, match="allowed"):
        uniform_candidates(("nope",))


def test_parse_targets():
    assert parse_targets("safe=0.005, balanced=0.02") == {"safe": 0.005, "balanced": 0.02}
    for bad in ("safe", "safe=-1", "=0.1", ""):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_choose_takes_the_highest_ratio_that_meets_on_both_texts():
    swept = {"a": {"kl": 0.001, "ratio": 2.0}, "b": {"kl": 0.004, "ratio": 3.0}, "c": {"kl": 0.02, "ratio": 5.0}}
    held_out = {"a": {"kl": 0.002, "ratio": 2.1, "ppl_change": 0.0}, "b": {"kl": 0.009, "ratio": 3.1,
                                                                        "ppl_change": 0.01}}
    picked = choose({"safe": 0.005}, swept, lambda name: held_out[name])
    # b has the higher ratio and met on the sweep text, but missed on held-out text
    assert picked["safe"]["candidate"] == "a"
    assert picked["safe"]["rejected"] == [{"candidate": "b", "verified_kl": 0.009}]
    with pytest.raises(ValueError, match="no candidate meets preset 'tight'"):
        choose({"tight": 1e-5}, swept, lambda name: held_out[name])


def _entry(name, target, kl):
    spec = CacheSpec(name=name)
    return {"name": name, "target_kl": target, "describe": spec.describe(), "spec": spec.to_dict(),
            "verified": {"kl": kl, "ratio": 2.0, "ppl_change": 0.01}}


def test_register_measured_adds_each_preset_once():
    registry = Registry()
    data = {"format": 1, "presets": [_entry("safe", 0.005, 0.004), _entry("balanced", 0.02, 0.01)]}
    assert register_measured(registry, data) == ["safe", "balanced"]
    assert registry.get("safe") == CacheSpec.from_dict(data["presets"][0]["spec"])
    assert "KL <= 0.005" in registry.help("safe")
    with pytest.raises(ValueError, match="already registered"):
        register_measured(registry, data)


def test_shipped_presets_are_registered_and_met_their_targets():
    data = load_measured()
    names = [entry["name"] for entry in data["presets"]]
    assert names == list(DEFAULT_TARGETS)
    assert data["texts"]["sweep"]["part"] == "calibration" and data["texts"]["verify"]["part"] == "evaluation"
    assert data["texts"]["sweep"]["offset"] >= 4096  # past the tokens calibration artifacts read
    assert data["command"].startswith("kvcompress measure-presets")
    ratios = []
    for entry in data["presets"]:
        assert PRESETS.get(entry["name"]) == CacheSpec.from_dict(entry["spec"])
        assert entry["verified"]["kl"] <= entry["target_kl"]
        assert entry["sweep"]["kl"] <= entry["target_kl"]
        ratios.append(entry["verified"]["ratio"])
    assert ratios == sorted(ratios)  # looser targets never give a smaller ratio


def test_verify_flags_a_preset_that_misses_its_target():
    data = {"presets": [_entry("safe", 0.005, 0.004), _entry("extreme", 0.15, 0.1)]}
    fake = {"safe": 0.003, "extreme": 0.2}  # extreme drifted past its target
    rows = verify_presets(data, lambda spec: {"kl": fake[spec.name], "ratio": 2.0, "ppl_change": 0.0})
    assert [(r["name"], r["met"]) for r in rows] == [("safe", True), ("extreme", False)]


def test_measured_presets_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="kvcompress measure-presets"):
        load_measured(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 99}')
    with pytest.raises(ValueError, match="re-run"):
        load_measured(bad)
