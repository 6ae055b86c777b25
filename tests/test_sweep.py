"""Sweep: one record per spec, resume without re-measuring or rewriting, failing specs recorded."""

import json

import pytest
import torch

from kvcompress.experiments.grid import expand_grid, load_grid, parse_specs
from kvcompress.experiments.records import load_records, record_path
from kvcompress.experiments.settings import SweepSettings, record_key
from kvcompress.experiments.sweep import run_sweep
from tiny_text import CharTokenizer


def quant(bits: int, name: str, **extra) -> dict:
    spec = {"name": name, "key": {"bits": bits, "axis": "channel", "group_size": 32},
            "value": {"bits": bits, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}
    spec.update(extra)
    return spec


SETTINGS = SweepSettings(eval_tokens=80, recon_tokens=72)


def entries(*bits_names):
    return load_grid({"specs": [quant(b, n) for b, n in bits_names]})


class Interrupted(Exception):
    pass


def test_resume_continues_and_leaves_written_records_byte_identical(tmp_path, tiny_llama):
    specs = entries((8, "a"), (4, "b"), (3, "c"), (2, "d"))
    seen = []

    def stop_after_two(record):
        seen.append(record["label"])
        if len(seen) == 2:
            raise Interrupted  # the sweep is killed right after the 2nd record is written

    with pytest.raises(Interrupted):
        run_sweep(specs, tmp_path, SETTINGS, model=tiny_llama, tokenizer=CharTokenizer(), on_record=stop_after_two)
    written = {label: record_path(tmp_path, label).read_bytes() for label in ("a", "b")}
    assert not record_path(tmp_path, "c").exists() and not record_path(tmp_path, "d").exists()

    measured = []
    records = run_sweep(specs, tmp_path, SETTINGS, model=tiny_llama, tokenizer=CharTokenizer(),
                        on_record=lambda r: measured.append(r["label"]))
    assert measured == ["c", "d"], "only the missing specs are measured again"
    assert [r["label"] for r in records] == ["a", "b", "c", "d"]
    for label, data in written.items():
        assert record_path(tmp_path, label).read_bytes() == data
    assert all(r["status"] == "ok" for r in records)
    assert [r["label"] for r in load_records(tmp_path)] == ["a", "b", "c", "d"]
    # Fewer bits, worse figures: the records hold real measurements.
    kl = [r["eval"]["kl"] for r in records]
    cos = [r["reconstruction"]["mean"]["value"]["cosine"] for r in records]
    assert kl[0] < kl[3] and cos[0] > cos[1] > cos[2] > cos[3]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["settings"]["eval_tokens"] == 80 and [s["label"] for s in config["specs"]] == ["a", "b", "c", "d"]

    # Changed settings change the key, so the record is measured again.
    other = SweepSettings(eval_tokens=72, recon_tokens=72)
    assert record_key(specs[0], other) != record_key(specs[0], SETTINGS)


def test_a_failing_spec_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_llama):
    bad = quant(4, "bad")
    bad["value"]["group_size"] = 24  # does not divide the tiny model's head_dim 32
    specs = load_grid({"specs": [quant(4, "good1"), bad, quant(2, "good2")]})
    records = run_sweep(specs, tmp_path, SETTINGS, model=tiny_llama, tokenizer=CharTokenizer())
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    error = json.loads(record_path(tmp_path, "bad").read_text())
    assert "group_size 24 does not divide head_dim 32" in error["error"]
    assert "Traceback" in error["traceback"]
    # A rerun retries the failed spec only (it fails again), keeping the good records.
    measured = []
    run_sweep(specs, tmp_path, SETTINGS, model=tiny_llama, tokenizer=CharTokenizer(),
              on_record=lambda r: measured.append(r["label"]))
    assert measured == ["bad"]


def test_grid_expansion_labels_and_flags():
    grid = {"name": "r{key.bits}-v{value.bits}", "base": quant(4, "x"), "vary": {"key.bits": [4, 2], "value.bits": [8]},
            "eval": False}
    assert [label for label, _ in expand_grid(grid)] == ["r4-v8", "r2-v8"]
    tied = expand_grid({"base": quant(4, "x"), "vary": {"key.bits,value.bits": [3]}})
    assert tied[0][1]["key"]["bits"] == tied[0][1]["value"]["bits"] == 3 and tied[0][0] == "key.bits,value.bits=3"
    got = load_grid({"specs": ["int4", {"spec": "int2", "tasks": False}], "grids": [grid]})
    assert [(e.label, e.tasks, e.eval) for e in got] == [("int4", True, True), ("int2", False, True),
                                                          ("r4-v8", False, False), ("r2-v8", False, False)]
    with pytest.raises(ValueError, match="share the label"):
        load_grid({"specs": ["int4", "int4"]})
    with pytest.raises(ValueError, match="non-empty 'vary'"):
        expand_grid({"base": {}, "vary": {}})


def test_parse_specs_from_a_list_and_from_grid_files(tmp_path):
    assert [e.label for e in parse_specs("int8, int4")] == ["int8", "int4"]
    spec_file = tmp_path / "mine.json"
    spec_file.write_text(json.dumps(quant(3, None)))
    assert [e.label for e in parse_specs(str(spec_file))] == ["mine"]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("specs:\n  - int2\n  - mine.json\ngrids:\n  - name: 'k{key.bits}'\n    base: {key: {axis: "
                         "channel}, value: {axis: token}}\n    vary: {key.bits: [8, 4]}\n")
    assert [e.label for e in parse_specs(str(grid_file))] == ["int2", "mine", "k8", "k4"]
    with pytest.raises(ValueError, match="unknown preset"):
        parse_specs("int4,nonsense")
    with pytest.raises(ValueError, match="unknown task"):
        SweepSettings(tasks=("passkey", "mmlu"))


def test_a_record_from_another_version_model_or_text_is_measured_again_and_the_log_says_why(tmp_path, tiny_llama,
                                                                                          monkeypatch, caplog):
    import kvcompress.fingerprint as fingerprint
    from conftest import make_tiny_llama

    specs = entries((4, "a"))
    run_sweep(specs, tmp_path, SETTINGS, model=tiny_llama, tokenizer=CharTokenizer())
    record = json.loads(record_path(tmp_path, "a").read_text())
    assert record["texts"]["eval"]["part"] == "report" and record["texts"]["eval"]["tokens"] == [0, 80]
    assert set(record["fingerprint"]["environment"]) == {"kvcompress", "transformers", "torch"}

    def rerun(model):
        measured = []
        caplog.clear()
        with caplog.at_level("WARNING", logger="kvcompress"):
            run_sweep(specs, tmp_path, SETTINGS, model=model, tokenizer=CharTokenizer(),
                      on_record=lambda r: measured.append(r["label"]))
        return measured, caplog.text

    assert rerun(tiny_llama)[0] == []  # same everything: reused
    real = fingerprint.environment
    monkeypatch.setattr(fingerprint, "environment", lambda: {**real(), "transformers": "9.9.9"})
    measured, log = rerun(tiny_llama)
    assert measured == ["a"] and "a: measuring again" in log and "environment.transformers" in log
    other = make_tiny_llama(seed=0)  # same config, one weight of the last layer changed
    with torch.no_grad():
        other.model.layers[-1].self_attn.o_proj.weight[0, 0] += 0.01
    measured, log = rerun(other)
    assert measured == ["a"] and "model.weights" in log
