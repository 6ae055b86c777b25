"""What the second audit (issue 25) found, one section per item: each bad argument is one line
naming the option or field and the fix (exit status 2, no traceback); eviction specs in sweeps;
`generate` resume; prompt-lookup decoding with eviction; intervals of short series.

The command-line tests need no model: every check runs before a model loads.
"""

from __future__ import annotations

import json

import pytest

from kvcompress import CompressedCache
from kvcompress.cli.main import main
from kvcompress.presets import load_spec


from test_reliability import assert_one_line_error, run_main  # noqa: E402


# --------------------------------------------------------------------------- 7: spec names and spec files


@pytest.mark.parametrize("name, words", [
    ("int4@snapkv:inf", ["int4@snapkv:inf", "KEEP a fraction in (0, 1]", "int4@snapkv:0.5"]),
    ("int4@snapkv:-inf", ["int4@snapkv:-inf", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:1e400", ["int4@snapkv:1e400", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:nan", ["int4@snapkv:nan", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:12.5", ["int4@snapkv:12.5", "whole number of tokens"]),
    ("@snapkv:0.5", ["@snapkv:0.5", "BASE a preset name", "int4@snapkv:0.5"]),
])
def test_bad_eviction_spec_names_are_one_line(capsys, name, words):
    status, err = run_main(capsys, "eval", "--spec", name)
    assert status == 2, err
    assert_one_line_error(err, "eval", "--spec", *words)


@pytest.mark.parametrize("content, missing", [
    ("{}", "'key' and no 'value'"),
    ('{"value": {"bits": 2, "axis": "token"}}', "'key'"),
    ('{"key": {"bits": 2, "axis": "channel"}, "window": 16}', "'value'"),
    ('{"eviction": {"policy": "snapkv", "keep": 0.5}}', "'key' and no 'value'"),
])
def test_spec_without_key_or_value_is_refused(tmp_path, capsys, content, missing):
    path = tmp_path / "spec.json"
    path.write_text(content)
    status, err = run_main(capsys, "eval", "--spec", str(path))
    assert status == 2, err
    assert_one_line_error(err, "eval", "--spec", "spec.json", f"no {missing} field", '{"method": "none"}')


def test_spec_that_writes_out_method_none_is_the_uncompressed_spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"key": {"method": "none"}, "value": {"method": "none"}}))
    spec = load_spec(str(path))
    assert (spec.key.method, spec.value.method) == ("none", "none")
    assert spec.key == load_spec("none").key and spec.value == load_spec("none").value
    with pytest.raises(ValueError, match="no 'key' field"):
        load_spec({"value": {"method": "none"}})


@pytest.mark.parametrize("model", [None, "int4", 3])
def test_compressed_cache_of_something_else_than_a_model_says_what_to_pass(model):
    with pytest.raises(TypeError, match=r"CompressedCache\(model, spec\)") as err:
        CompressedCache(model, "int4")
    assert type(model).__name__ in str(err.value)


# --------------------------------------------------------------------------- 9: loose or unclear validation


CLI_CASES = [  # (argv with {d} for a temporary folder, command, words the one line must hold)
    (["tune", "--max-kl", "inf", "--out", "{d}/t.json"], "tune", ["--max-kl", "finite", "--max-kl 0.01"]),
    (["tune", "--max-ppl-change", "inf", "--out", "{d}/t.json"], "tune", ["--max-ppl-change", "finite"]),
    (["tune", "--max-kl", "0.01", "--tune-offset", "-5", "--out", "{d}/t.json"], "tune",
     ["--tune-offset", "got -5", "--tune-offset 8192"]),
    (["measure-presets", "--targets", "safe=inf", "--file", "{d}/m.json"], "measure-presets",
     ["--targets safe=inf", "finite value"]),
    (["measure-presets", "--targets", "safe=0.01,safe=0.02", "--file", "{d}/m.json"], "measure-presets",
     ["--targets", "'safe' is given twice"]),
    (["measure-presets", "--targets", "int4=0.01", "--file", "{d}/m.json"], "measure-presets",
     ["--targets int4=0.01", "'int4' is already the name of another preset", "choose another name"]),
    (["measure-presets", "--targets", "safe=0.01,prompt-6x=0.02", "--file", "{d}/m.json"], "measure-presets",
     ["'prompt-6x' is already the name"]),
    (["measure-presets", "--context", "512", "--min-ratios", "int2=6", "--file", "{d}/m.json"], "measure-presets",
     ["--min-ratios int2=6", "'int2' is already the name"]),
    (["measure-presets", "--passkey-lengths", "0", "--file", "{d}/m.json"], "measure-presets",
     ["--passkey-lengths 0", "positive number of tokens"]),
    (["measure-presets", "--sweep-tokens", "5", "--file", "{d}/m.json"], "measure-presets",
     ["--sweep-tokens 5", "--sweep-tokens 165 or more"]),
    (["measure-presets", "--verify-tokens", "5", "--file", "{d}/m.json"], "measure-presets",
     ["--verify-tokens 5", "--verify-tokens 165 or more"]),
    (["sweep", "--specs", "int4", "--out", "{d}/s", "--tasks", "passkey", "--passkey-lengths", "0"], "sweep",
     ["--passkey-lengths 0", "positive number of tokens", "e.g. --passkey-lengths"]),
    (["analyze", "--out", "{d}/a", "--passkey-lengths", "256,0"], "analyze", ["--passkey-lengths 256,0"]),
    (["generate", "--input", "{d}/binary.jsonl", "--output", "{d}/out.jsonl"], "generate",
     ["--input", "binary.jsonl", "not UTF-8"]),
]


@pytest.mark.parametrize("argv, command, words", CLI_CASES, ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_bad_arguments_are_one_line_naming_the_option(tmp_path, capsys, argv, command, words):
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe caf\xe9"}\n')
    status, err = run_main(capsys, *(a.replace("{d}", str(tmp_path)) for a in argv))
    assert status == 2, err
    assert_one_line_error(err, command, *words)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "out.jsonl").exists()


def test_measure_presets_may_measure_the_shipped_names_again(tmp_path, capsys, monkeypatch):
    """The names of the file a run replaces are not taken: the check stops only true clashes."""
    import kvcompress.cli.measure_presets as cli

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt  # the run got past every check

    monkeypatch.setattr(cli, "load_model_from_args", stop)
    status, _ = run_main(capsys, "measure-presets", "--targets", "safe=0.01,balanced=0.02",
                         "--file", str(tmp_path / "m.json"))
    assert status == 130
    status, _ = run_main(capsys, "measure-presets", "--context", "512", "--min-ratios", "prompt-6x=6",
                         "--file", str(tmp_path / "p.json"))
    assert status == 130


def test_ray_auto_without_a_cluster_names_the_option(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already joined in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    status, err = run_main(capsys, "sweep", "--specs", "int4", "--out", str(tmp_path / "s"), "--ray", "auto")
    assert status == 2, err
    assert_one_line_error(err, "sweep", "--ray auto", "ray start --head", "bare --ray")
    assert "--address" not in err
    assert not (tmp_path / "s").exists()


def test_tune_context_beyond_the_model_blames_context(tmp_path, capsys, monkeypatch, tiny_llama):
    from tiny_text import CharTokenizer

    monkeypatch.setattr("kvcompress.cli.tune.load_model_from_args", lambda args: (tiny_llama, CharTokenizer()))
    status, err = run_main(capsys, "tune", "--max-kl", "0.01", "--out", str(tmp_path / "t.json"),
                           "--context", "100000", "--tokens", "64", "--verify-tokens", "64")
    assert status == 2, err
    assert_one_line_error(err, "tune", "--context 100000", "context of 1024", "--context 959 or less")
    assert "--tokens 64:" not in err


def test_generate_logs_no_hint_to_enable_what_it_enabled(tmp_path, caplog, monkeypatch):
    import logging

    from kvcompress.cache import attention
    from kvcompress.generate import GenerateSettings, generate_file
    from tiny_loader import tiny_llama_loader

    monkeypatch.setattr(attention, "_hint_logged", False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "some words of a prompt " * 3}) + "\n")
    with caplog.at_level(logging.INFO, logger="kvcompress"):
        summary = generate_file(prompts, tmp_path / "o.jsonl", GenerateSettings(spec="int8", max_new_tokens=4),
                                loader=tiny_llama_loader)
        assert summary["ok"] == 1
        assert not [r for r in caplog.records if "enable_fast_attention(model)" in r.getMessage()]
        CompressedCache(tiny_llama_loader(None)[0], "int8")  # built outside the switch: the hint is due
    assert [r for r in caplog.records if "enable_fast_attention(model)" in r.getMessage()]


# --------------------------------------------------------------------------- 2: eviction specs in sweep / analyze


@pytest.fixture
def tiny_sweep_model(monkeypatch, tiny_llama):
    """`kvcompress sweep` and `analyze` measure on the tiny Llama with the character tokenizer."""
    from tiny_text import CharTokenizer

    monkeypatch.setattr("kvcompress.experiments.sweep.load_from_settings", lambda settings: (tiny_llama,
                                                                                             CharTokenizer()))
    return tiny_llama


@pytest.mark.parametrize("protocol", [["--context", "256", "--tokens", "64"], ["--tokens", "200"]],
                         ids=["context", "decode-faithful"])
def test_item2_sweep_writes_a_record_for_an_eviction_spec(tmp_path, capsys, tiny_sweep_model, protocol):
    from kvcompress.experiments.records import load_records

    out = tmp_path / "sweep"
    status = main(["sweep", "--specs", "int4,int4@snapkv:0.5", *protocol, "--recon-tokens", "128", "--tasks", "none",
                   "--out", str(out), "--threads", "1"])
    assert status == 0, capsys.readouterr().err
    records = {r["label"]: r for r in load_records(out)}
    assert sorted(records) == ["int4", "int4@snapkv:0.5"] and all(r["status"] == "ok" for r in records.values())
    plain, evicted = records["int4"], records["int4@snapkv:0.5"]
    # the reconstruction step measures the codecs (the same as int4's) and says that eviction is left out
    assert evicted["reconstruction"]["mean"] == plain["reconstruction"]["mean"]
    assert plain["reconstruction"]["mean"]["key"]["cosine"] < 0.9999  # decoded codes, not the captured states
    assert "eviction" in evicted["reconstruction"]["note"] and "note" not in plain["reconstruction"]
    if "--context" in protocol:  # the prompt protocol measures the eviction: fewer bytes, another KL
        assert evicted["eval"]["evicted_tokens"] > 0 == plain["eval"]["evicted_tokens"]
        assert evicted["eval"]["stored_bytes"] < plain["eval"]["stored_bytes"]
        assert evicted["eval"]["kl"] != plain["eval"]["kl"]
    else:  # no prompt: the evaluation is skipped with the reason, never an error
        assert "eval" not in evicted and "--context" in evicted["eval_skipped"]
        assert plain["eval"]["tokens"] > 0
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| int4@snapkv:0.5 |" in report and "- int4@snapkv:0.5: codecs only" in report


def test_item2_analyze_measures_eviction_specs(tmp_path, tiny_llama):
    pytest.importorskip("matplotlib")
    from kvcompress.experiments.analysis import analyze
    from kvcompress.experiments.grid import parse_specs
    from kvcompress.experiments.records import load_records
    from kvcompress.experiments.sweep import SweepSettings
    from tiny_text import CharTokenizer

    settings = SweepSettings(eval_tokens=48, recon_tokens=72, tasks=("passkey",), passkey_lengths=(256,),
                             passkey_depths=(0.5,), context_tokens=200)
    path = analyze(tmp_path, settings, entries=parse_specs("int4,none@streaming:0.5"), model=tiny_llama,
                   tokenizer=CharTokenizer())
    records = {r["label"]: r for r in load_records(tmp_path)}
    assert all(r["status"] == "ok" for r in records.values()), [r.get("error") for r in records.values()]
    streaming = records["none@streaming:0.5"]
    assert streaming["eval"]["evicted_tokens"] > 0 and "needle_kept" in streaming["tasks"]["passkey"]
    assert "none@streaming:0.5" in path.read_text()


# --------------------------------------------------------------------------- 6: intervals of short series


def test_item6_a_series_shorter_than_four_blocks_has_no_interval():
    import torch

    from kvcompress.measure.bootstrap import MIN_BLOCKS, block_bootstrap_ci, interval_text

    stats = {"mean": lambda r: r["x"].mean(dim=1)}
    x = torch.linspace(0, 1, 4 * 64)
    intervals, method = block_bootstrap_ci({"x": x[:-1]}, stats, block=64)
    assert intervals == {"mean": None} and MIN_BLOCKS == 4
    assert method == {"ci_method": "n/a", "block_tokens": 64, "tokens": 255, "min_tokens": 256}
    assert interval_text(None, method) == "no 95% CI: 255 tokens, fewer than 4 blocks of 64; score 256 or more for one"
    intervals, method = block_bootstrap_ci({"x": x}, stats, block=64)
    lo, hi = intervals["mean"]
    assert lo < x.mean().item() < hi and hi - lo > 0.05  # four blocks: an interval of real width
    assert method["ci_method"] == "moving-block bootstrap"


@pytest.mark.parametrize("tokens, has_interval", [(64, False), (256, True)])
def test_item6_eval_prints_and_records_no_interval_for_a_short_series(tmp_path, capsys, monkeypatch, tiny_llama,
                                                                       tokens, has_interval):
    from tiny_text import CharTokenizer

    monkeypatch.setattr("kvcompress.cli.eval.load_model_from_args", lambda args: (tiny_llama, CharTokenizer()))
    out = tmp_path / "eval.json"
    status = main(["eval", "--spec", "int4", "--context", "200", "--tokens", str(tokens), "--json", str(out),
                   "--no-progress", "--threads", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    record = json.loads(out.read_text())
    kl_line = next(line for line in printed.splitlines() if line.startswith("KL "))
    if has_interval:
        lo, hi = record["kl_ci95"]
        assert lo <= record["kl"] <= hi and lo < hi and "95% CI" in kl_line
        assert record["interval"]["ci_method"] == "moving-block bootstrap"
    else:
        assert record["kl_ci95"] is None and record["ppl_change_ci95"] is None
        assert record["interval"]["ci_method"] == "n/a" and record["interval"]["min_tokens"] == 256
        assert "no 95% CI: 64 tokens" in kl_line and ".." not in kl_line


# --------------------------------------------------------------------------- 4: generate resume


def _generate(inp, out, spec="int8", **extra):
    from kvcompress.generate import GenerateSettings, generate_file
    from tiny_loader import tiny_llama_loader

    return generate_file(inp, out, GenerateSettings(spec=spec, max_new_tokens=4, **extra), loader=tiny_llama_loader)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompts(path, *texts, ids=False):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t} if ids else {"prompt": t}) + "\n"
                            for i, t in enumerate(texts)))


def test_item4_resume_with_another_spec_is_refused_in_one_line(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _prompts(inp, "alpha beta gamma", "delta epsilon", ids=True)
    assert _generate(inp, out)["ok"] == 2
    before = out.read_bytes()
    for argv, differs in ((["--spec", "int4", "--max-new-tokens", "4"], "its spec differs"),
                          (["--spec", "int8", "--max-new-tokens", "5"], "its max_new_tokens differs")):
        status, err = run_main(capsys, "generate", "--input", str(inp), "--output", str(out), *argv)
        assert status == 2, err
        assert_one_line_error(err, "generate", f"--output {out}", "2 results of another run", differs,
                              "pass another --output")
    assert out.read_bytes() == before  # nothing appended under a summary of other settings


def test_item4_a_line_inserted_at_the_top_is_generated_and_the_others_keep_their_text(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _prompts(inp, "alpha beta gamma", "delta epsilon")
    _generate(inp, out)
    first = {r["id"]: r["text"] for r in _jsonl(out) if r.get("status") == "ok"}
    _prompts(inp, "a new first prompt", "alpha beta gamma", "delta epsilon")
    summary = _generate(inp, out)
    assert (summary["ok"], summary["skipped"]) == (1, 2)
    rows = [r for r in _jsonl(out) if "id" in r]
    assert sorted(r["id"] for r in rows) == ["line-1", "line-2", "line-3"]  # one line per prompt
    by_id = {r["id"]: r for r in rows}
    assert by_id["line-2"]["text"] == first["line-1"] and by_id["line-3"]["text"] == first["line-2"]
    fresh = _generate(inp, tmp_path / "fresh.jsonl")  # the same prompts from scratch
    assert fresh["ok"] == 3
    assert {r["id"]: r["text"] for r in _jsonl(tmp_path / "fresh.jsonl") if "id" in r} == \
        {i: r["text"] for i, r in by_id.items()}


def test_item4_error_lines_are_replaced_not_duplicated(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "alpha beta"}) + "\n{not json\n")
    for _ in range(3):
        summary = _generate(inp, out)
        rows = _jsonl(out)
        assert [r["id"] for r in rows if "id" in r] == ["line-1", "line-2"]
        assert [r.get("status") for r in rows if "id" in r] == ["ok", "error"]
        assert len([r for r in rows if "summary" in r]) == 1
    assert (summary["skipped"], summary["errors"]) == (1, 1)


def test_item4_output_equal_to_input_is_refused(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    _prompts(inp, "alpha beta")
    before = inp.read_bytes()
    status, err = run_main(capsys, "generate", "--input", str(inp), "--output", str(tmp_path / "." / "in.jsonl"))
    assert status == 2
    assert_one_line_error(err, "generate", "--output", "is the --input file", "another --output")
    assert inp.read_bytes() == before


def test_item4_interrupt_message_counts_what_was_written(tmp_path, capsys, monkeypatch):
    import kvcompress.generate as generate
    from tiny_loader import tiny_llama_loader

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _prompts(inp, "one prompt", "two prompt", "three prompt", "four prompt")
    calls = []
    original = generate.Generator.__call__

    def stop_at_the_fourth(self, prompt):
        calls.append(prompt.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, prompt)

    monkeypatch.setattr(generate.Generator, "__call__", stop_at_the_fourth)
    monkeypatch.setattr(generate, "load_from_settings", tiny_llama_loader)
    status, err = run_main(capsys, "generate", "--input", str(inp), "--output", str(out), "--spec", "int8",
                           "--max-new-tokens", "4")
    assert status == 130
    assert err.strip().splitlines() == [f"kvcompress generate: interrupted; {out} holds 3 generated prompt(s) and 0 "
                                        "error line(s); run the same command again to resume"]
    assert len([r for r in _jsonl(out) if r.get("status") == "ok"]) == 3


# --------------------------------------------------------------------------- 8: the bench's byte prediction


@pytest.mark.parametrize("spec", ["int4@snapkv:0.5", "int4@streaming:200", "int2@tova:0.25", "int4"])
def test_item8_predicted_bytes_count_the_tokens_eviction_keeps(tiny_llama, fast_attention, spec):
    import torch

    from kvcompress.bench.nbytes import cache_stored_bytes, predicted_stored_bytes

    prompt, steps = 400, 3
    ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(fast_attention(tiny_llama), spec)
    with torch.inference_mode():
        out = tiny_llama(ids, cache=cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = tiny_llama(token, cache=cache).logits[:, -1:].argmax(-1)
    stored = cache_stored_bytes(cache)
    config = tiny_llama.config
    assert predicted_stored_bytes(spec, config, prompt + steps, torch.float32, prompt_tokens=prompt) == stored
    if "@" in spec:  # the prediction the bench made before: as if every token were kept
        assert stored < 0.8 * predicted_stored_bytes(spec.split("@")[0], config, prompt + steps, torch.float32)


def test_item8_generation_time_eviction_has_no_closed_form():
    import torch

    from kvcompress.bench.nbytes import predicted_stored_bytes
    from conftest import make_tiny_llama

    spec = load_spec("int4@snapkv:0.5").to_dict()
    spec["eviction"]["applies"] = "generation"
    config = make_tiny_llama().config
    assert predicted_stored_bytes(load_spec(spec), config, 400, torch.float32) is None


# --------------------------------------------------------------------------- 5: eviction is for the prompt only


@pytest.mark.parametrize("spec", ["none@snapkv:0.5", "int8@streaming:0.5"])
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant_model"])
def test_item5_assisted_and_prompt_lookup_decoding_are_refused_for_eviction_specs(tiny_llama, fast_attention, spec,
                                                                                   mode):
    import torch

    from conftest import make_tiny_llama

    model = fast_attention(tiny_llama)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0)).repeat(1, 25)  # 300 tokens
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, cache=CompressedCache(model, spec), **greedy)  # eviction itself works
    assert plain.shape[1] == 308
    cache = CompressedCache(model, spec)
    assert not cache.is_croppable and CompressedCache(model, spec.split("@")[0]).is_croppable
    extra = (dict(prompt_lookup_num_tokens=5) if mode == "prompt_lookup"
             else dict(assistant_model=make_tiny_llama(seed=1), num_assistant_tokens=4))
    with pytest.raises(ValueError, match="Assisted decoding requires a cache that can be cropped"):
        model.generate(ids, cache=cache, **greedy, **extra)
