"""Options of benchmark scripts: a wrong value is one line naming the option, exit 2, before any model
loads or kernel runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, option", [
    (["benchmarks/passkey_eviction.py", "--policies", "", "--specs", "int4"], "--specs int4"),  # evicts nothing
    (["benchmarks/passkey_eviction.py", "--policies", "", "--specs", "no-such-preset"], "no-such-preset"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs,novels"], "--kinds docs,novels"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs,docs"], "--kinds docs,docs"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs", "--compare"], "--compare"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs", "--references", "docs=no-such-file.jsonl"],
     "--references docs=no-such-file.jsonl"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs,code", "--references", "docs=a.jsonl"],
     "--references docs=a.jsonl"),
    (["benchmarks/gpu_paged.py", "--dry-run", "--out", "runs/unused", "--preset", "int4"], "--preset 'int4'"),
    (["benchmarks/per_head_budgets.py", "--kinds", "docs,novels"], "--kinds docs,novels"),
    (["benchmarks/kinds_table.py", "--kinds", "docs,docs"], "--kinds docs,docs"),
    (["benchmarks/prompt_floors.py", "--specs", "prompt-6x=6", "--kinds", "docs,novels"], "--kinds docs,novels"),
    (["benchmarks/prompt_floors.py", "--specs", "no-such-preset=6"], "no-such-preset"),
    (["benchmarks/prompt_floors.py", "--specs", "prompt-6x"], "--specs prompt-6x"),
    (["benchmarks/key_space_errors.py", "--kinds", "novels"], "--kinds novels"),
    (["benchmarks/plane_key_errors.py", "--kinds", ""], "--kinds"),
    (["benchmarks/kinds_codec_errors.py", "--kinds", "docs,novels"], "--kinds docs,novels"),
    (["benchmarks/per_head_budgets.py", "--policies", "streaming"], "--policies"),
    (["benchmarks/per_head_budgets.py", "--keep", "0.2,1.5"], "--keep 0.2,1.5"),
    (["benchmarks/prefill_attention.py", "--tokens", "0"], "--tokens"),
    (["benchmarks/layer_bits_sensitivity.py", "--layers", "abc"], "--layers abc"),
    (["benchmarks/layer_bits_sensitivity.py", "--kinds", "novels"], "--kinds novels"),
    (["benchmarks/vllm_serving.py", "throughput", "--auto-space", "-1", "--out", "runs/unused.json"], "--auto-space -1"),
    (["benchmarks/vllm_serving.py", "throughput", "--auto-space", "4", "--pool-mib", "40", "--out", "runs/unused.json"],
     "--auto-space"),
])
def test_wrong_option_is_one_line_and_exit_2(args, option):
    proc = run_script(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr


IDS_FILE = {"ids": [1, 2, 3], "ids_sha256": "abc", "model": {"argument": None}, "protocol": {"context_tokens": 2}}


@pytest.fixture
def side_by_side(monkeypatch):
    """benchmarks/side_by_side.py as a module, with no model loaded and `prompt_eval` faked: each call
    is recorded in `side.measured` and gets KL 0.1 x the number of calls so far."""
    import importlib.util
    from types import SimpleNamespace

    import kvcompress.measure.prompt as protocol
    import kvcompress.models as models

    spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "benchmarks" / "side_by_side.py")
    side = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side)
    side.measured = []

    def fake_eval(model, ids, name, context, **kwargs):
        side.measured.append(name)
        return SimpleNamespace(kept_fraction=1.0, context_compression=3.2, whole_cache_ratio=2.0,
                               kl=0.1 * len(side.measured), kl_ci95=(0.0, 1.0), ppl_change=0.01, top1=0.9,
                               ppl_baseline=4.0)

    monkeypatch.setattr(protocol, "prompt_eval", fake_eval)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None))
    return side


def test_side_by_side_reuses_a_saved_row_only_for_the_same_spec(tmp_path, monkeypatch, side_by_side):
    """A row saved under a preset's name is measured again once the name means another spec."""
    import json

    import kvcompress.calibration as calibration
    from kvcompress import load_spec

    monkeypatch.setattr(calibration, "artifact_for", lambda model, spec, folder: None)  # int4 needs none
    done = tmp_path / "rows.jsonl"
    stale = {"spec": "int4", "ids_sha256": "abc", "dtype": "float32", "kl": 9.0,
             "spec_dict": load_spec("int3").to_dict()}  # saved when "int4" meant another spec
    done.write_text(json.dumps(stale) + "\n")
    (row,) = side_by_side.kvcompress_rows(IDS_FILE, ["int4"], "float32", done)
    assert side_by_side.measured == ["int4"] and row["kl"] == 0.1 and row["spec_dict"] == load_spec("int4").to_dict()
    (again,) = side_by_side.kvcompress_rows(IDS_FILE, ["int4"], "float32", done)  # now saved with its spec: reused
    assert side_by_side.measured == ["int4"] and again["kl"] == 0.1


def test_side_by_side_measures_a_calibrated_spec_again_after_the_artifact_changes(tmp_path, monkeypatch,
                                                                                   side_by_side):
    """A calibrated codec's saved row is reused only for the calibration artifact it was measured with."""
    from types import SimpleNamespace

    import kvcompress.calibration as calibration

    checksum = {"value": "first"}
    monkeypatch.setattr(calibration, "artifact_for",
                        lambda model, spec, folder: SimpleNamespace(metadata={"tensors_sha256": checksum["value"]}))
    done = tmp_path / "rows.jsonl"
    (first,) = side_by_side.kvcompress_rows(IDS_FILE, ["bits3"], "float32", done)
    (same,) = side_by_side.kvcompress_rows(IDS_FILE, ["bits3"], "float32", done)
    assert side_by_side.measured == ["bits3"] and same["kl"] == first["kl"]
    checksum["value"] = "second"  # the artifact was calibrated again, on other text
    (again,) = side_by_side.kvcompress_rows(IDS_FILE, ["bits3"], "float32", done)
    assert side_by_side.measured == ["bits3", "bits3"] and again["kl"] != first["kl"]
    assert again["calibrated_on"] == "second"


def test_vllm_serving_keeps_its_rounds_when_asked_for_more(tmp_path):
    """A throughput or decode file measured with 2 rounds resumes under 3 (only round 3 is new); a file
    measured with other settings (here another prompt length) starts over."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("vllm_serving", ROOT / "benchmarks" / "vllm_serving.py")
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    path = tmp_path / "throughput.json"
    measured = {"auto#0": {"output_tokens_per_s": 26.0}, "auto#1": {"output_tokens_per_s": 26.9}}
    path.write_text(json.dumps({"settings": {"prompt": 1920, "repeats": 2}, "results": measured}))

    resumed = serving.load(path, {"prompt": 1920, "repeats": 3})
    assert resumed["results"] == measured and resumed["settings"]["repeats"] == 3
    assert serving.load(path, {"prompt": 128, "repeats": 2})["results"] == {}


def test_window_sensitivity_attention_reads_coded_states_only_past_the_window():
    """layer_bits_sensitivity.py --window: query t reads token s coded when t - s >= window: a window
    past the sequence is exact causal attention, window 0 attention over the coded states, and in
    between each query mixes the two as a by-hand loop does."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("sens", ROOT / "benchmarks" / "layer_bits_sensitivity.py")
    sens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sens)
    gen = torch.Generator().manual_seed(0)
    q, k, v, ck, cv = (torch.randn(1, h, 12, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2, 2, 2))
    causal = torch.nn.functional.scaled_dot_product_attention
    exact = causal(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    coded = causal(q, ck.repeat_interleave(2, 1), cv.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    torch.testing.assert_close(sens.windowed_attention(q, k, v, ck, cv, 12, 0.3), exact.transpose(1, 2))
    torch.testing.assert_close(sens.windowed_attention(q, k, v, ck, cv, 0, 0.3), coded.transpose(1, 2))
    got = sens.windowed_attention(q, k, v, ck, cv, 5, 0.3)  # (B, T, Hq, D)
    for t in (0, 4, 5, 11):
        keys = torch.stack([ck[0, :, s] if t - s >= 5 else k[0, :, s] for s in range(t + 1)], 1)  # (H, t+1, D)
        vals = torch.stack([cv[0, :, s] if t - s >= 5 else v[0, :, s] for s in range(t + 1)], 1)
        p = torch.softmax(q[0, :, t, None] @ keys.repeat_interleave(2, 0).transpose(-1, -2) * 0.3, -1)
        torch.testing.assert_close(got[0, t], (p @ vals.repeat_interleave(2, 0))[:, 0])
