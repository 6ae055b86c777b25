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


def assert_one_line_error(stderr: str, command: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(f"kvcompress {command}: error: "), lines[0]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def run_main(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


# --------------------------------------------------------------------------- 7: spec names and spec files


@pytest.mark.parametrize("name, words", [
    ("int4@snapkv:inf", ["int4@snapkv:inf", "KEEP a fraction in (0, 1]", "int4@snapkv:0.5"]),
    ("int4@snapkv:-inf", ["int4@snapkv:-inf", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:1e400", ["int4@snapkv:1e400", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:nan", ["int4@snapkv:nan", "KEEP a fraction in (0, 1]"]),
    ("int4@snapkv:12.5", ["int4@snapkv:12.5", "whole number of tokens"]),
    ("@snapkv:0.5", ["@snapkv:0.5", "BASE a preset name", "int4@snapkv:0.5"]),
])
def test_item7_bad_eviction_spec_names_are_one_line(capsys, name, words):
    status, err = run_main(capsys, "eval", "--spec", name)
    assert status == 2, err
    assert_one_line_error(err, "eval", "--spec", *words)


@pytest.mark.parametrize("content, missing", [
    ("{}", "'key' and no 'value'"),
    ('{"value": {"bits": 2, "axis": "token"}}', "'key'"),
    ('{"key": {"bits": 2, "axis": "channel"}, "window": 16}', "'value'"),
    ('{"eviction": {"policy": "snapkv", "keep": 0.5}}', "'key' and no 'value'"),
])
def test_item9_spec_without_key_or_value_is_refused(tmp_path, capsys, content, missing):
    path = tmp_path / "spec.json"
    path.write_text(content)
    status, err = run_main(capsys, "eval", "--spec", str(path))
    assert status == 2, err
    assert_one_line_error(err, "eval", "--spec", "spec.json", f"no {missing} field", '{"method": "none"}')


def test_item9_spec_that_writes_out_method_none_is_the_uncompressed_spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"key": {"method": "none"}, "value": {"method": "none"}}))
    spec = load_spec(str(path))
    assert (spec.key.method, spec.value.method) == ("none", "none")
    assert spec.key == load_spec("none").key and spec.value == load_spec("none").value
    with pytest.raises(ValueError, match="no 'key' field"):
        load_spec({"value": {"method": "none"}})


@pytest.mark.parametrize("model", [None, "int4", 3])
def test_item9_compressed_cache_of_something_else_than_a_model_says_what_to_pass(model):
    with pytest.raises(TypeError, match=r"CompressedCache\(model, spec\)") as err:
        CompressedCache(model, "int4")
    assert type(model).__name__ in str(err.value)


# --------------------------------------------------------------------------- 9: loose or unclear validation


CLI_CASES = [  # (argv with {d} for a temporary folder, command, words the one line must hold)
    (["tune", "--max-kl", "inf", "--out", "{d}/t.json"], "tune", ["--max-kl", "finite", "--max-kl 0.01"]),
    (["tune", "--max-ppl-change", "inf", "--out", "{d}/t.json"], "tune", ["--max-ppl-change", "finite"]),
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
    (["generate", "--input", "{d}/binary.jsonl", "--output", "{d}/out.jsonl"], "generate",
     ["--input", "binary.jsonl", "not UTF-8"]),
]


@pytest.mark.parametrize("argv, command, words", CLI_CASES, ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_item9_bad_arguments_are_one_line_naming_the_option(tmp_path, capsys, argv, command, words):
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe caf\xe9"}\n')
    status, err = run_main(capsys, *(a.replace("{d}", str(tmp_path)) for a in argv))
    assert status == 2, err
    assert_one_line_error(err, command, *words)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "out.jsonl").exists()


def test_item9_measure_presets_may_measure_the_shipped_names_again(tmp_path, capsys, monkeypatch):
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


def test_item9_ray_auto_without_a_cluster_names_the_option(tmp_path, capsys, monkeypatch):
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


def test_item9_tune_context_beyond_the_model_blames_context(tmp_path, capsys, monkeypatch, tiny_llama):
    from tiny_text import CharTokenizer

    monkeypatch.setattr("kvcompress.cli.tune.load_model_from_args", lambda args: (tiny_llama, CharTokenizer()))
    status, err = run_main(capsys, "tune", "--max-kl", "0.01", "--out", str(tmp_path / "t.json"),
                           "--context", "100000", "--tokens", "64", "--verify-tokens", "64")
    assert status == 2, err
    assert_one_line_error(err, "tune", "--context 100000", "context of 1024", "--context 959 or less")
    assert "--tokens 64:" not in err


def test_item9_generate_logs_no_hint_to_enable_what_it_enabled(tmp_path, caplog, monkeypatch):
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
