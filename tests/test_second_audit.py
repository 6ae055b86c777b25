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
