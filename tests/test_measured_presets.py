"""Presets chosen by measurement: selection logic, the shipped data file, registration, verification."""

import json

import pytest

from kvcompress.presets.measured import load_measured, register_measured
from kvcompress.tuning.candidates import uniform_candidates
from kvcompress.tuning.preset_selection import DEFAULT_TARGETS, choose, parse_targets, verify_presets
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


def test_shipped_presets_are_the_choice_their_own_sweep_implies():
    """Re-derive every preset from the file's own sweep figures: the candidates that met the target
    on the sweep text, by ratio, are the rejected ones (in order) and then the chosen one. A file
    edited by hand, or a `choose` that skipped a better candidate, fails here."""
    data = load_measured()
    names = [entry["name"] for entry in data["presets"]]
    assert names == list(DEFAULT_TARGETS)
    assert data["texts"]["sweep"]["part"] == "calibration"
    assert data["texts"]["verify"]["part"] == "selection"
    sweep = data["texts"]["sweep"]
    first = sweep["tokens"][0] if isinstance(sweep["tokens"], list) else sweep["offset"]
    assert first >= 4096  # past the tokens calibration artifacts read
    assert data["command"].startswith("kvcompress measure-presets")
    swept = {c["name"]: c["sweep"] for c in data["candidates"]}
    for entry in data["presets"]:
        assert PRESETS.get(entry["name"]) == CacheSpec.from_dict(entry["spec"])
        meeting = sorted((n for n, f in swept.items() if f["kl"] <= entry["target_kl"]), key=lambda n: -swept[n]["ratio"])
        rejected = [r["candidate"] for r in entry["rejected"]]
        assert meeting[:len(rejected) + 1] == rejected + [entry["candidate"]], entry["name"]
        assert entry["sweep"] == swept[entry["candidate"]]


def test_select_presets_refuses_to_choose_on_the_report_part(tiny_llama):
    from kvcompress.tuning.preset_selection import SelectionSettings, select_presets

    with pytest.raises(ValueError, match="must not read the 'report' part"):
        select_presets(tiny_llama, WordIds(), {"safe": 0.01},
                       settings=SelectionSettings(sweep_tokens=64, sweep_offset=0, verify_tokens=64, verify_part="report"))


class WordIds:
    """A stand-in tokenizer: one small id per word (the tiny model's vocabulary has 128 ids)."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [3 + len(word) % 100 for word in text.split()]}


def test_measure_presets_writes_under_runs_by_default(tmp_path, monkeypatch):
    import kvcompress.cli.measure_presets as command
    import kvcompress.tuning.preset_selection as selection
    from kvcompress.cli.main import main
    from kvcompress.presets.measured import DATA_FILE

    shipped = DATA_FILE.read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(command, "load_model_from_args", lambda args: (None, None))
    monkeypatch.setattr(selection, "select_presets", lambda *a, **k: {"format": 1, "presets": [], "state": k["state"]})
    assert main(["measure-presets"]) == 0
    written = tmp_path / "runs" / "measured_presets.json"
    assert json.loads(written.read_text())["state"] == "runs/measured_presets.state.json"
    assert DATA_FILE.read_bytes() == shipped  # the installed package is not written to


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


def test_a_missing_shipped_presets_file_is_an_error_naming_it(tmp_path, monkeypatch):
    from kvcompress.presets import measured

    gone = tmp_path / "prompt_presets.json"  # as in a wheel built without it
    monkeypatch.setattr(measured, "SHIPPED", (measured.DATA_FILE, gone))
    with pytest.raises(FileNotFoundError, match="prompt_presets.json is missing from the installed kvcompress"):
        load_measured(gone)
