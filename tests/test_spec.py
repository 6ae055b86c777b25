"""Specs validate, serialize and merge per-layer overrides; presets resolve by name."""

import json

import pytest

from kvcompress import CacheSpec, CompressedCache, load_spec
from kvcompress.presets import PRESETS, Registry

KIVI4 = {"key": {"bits": 4, "axis": "channel"}, "value": {"bits": 4, "axis": "token"}}


def test_presets_exist_and_round_trip():
    for name in ("int8", "int4", "int2", "none"):
        spec = load_spec(name)
        assert spec.name == name
        assert CacheSpec.from_dict(json.loads(spec.to_json())) == spec


def test_int4_preset_is_kivi_style():
    spec = load_spec("int4")
    assert (spec.key.bits, spec.key.axis) == (4, "channel")
    assert (spec.value.bits, spec.value.axis) == (4, "token")
    assert (spec.window, spec.sinks) == (128, 4)


@pytest.mark.parametrize("bad, message", [
    ({"key": {"bits": 5}}, r"bits must be one of \(2, 3, 4, 8\)"),
    ({"value": {"method": "magic"}}, "method must be one of"),
    ({"key": {"axis": "channel", "group_size": 24}}, "must divide block_size"),
    ({"block_size": 4, "key": {"axis": "channel", "group_size": 4}}, "packs 8 tokens per row"),
    ({"window": -1}, "window must be an integer >= 0"),
    ({"foo": 1}, "unknown field"),
    ({"key": {"bitz": 4}}, "unknown field"),
    ({"layers": {"x": {"key": {"bits": 8}}}}, "layer override keys"),
    ({"layers": {"0": {"query": {}}}}, "must be a mapping with 'key' and/or 'value'"),
    ({"layers": {"0": {"key": {"bits": 7}}}}, r"bits must be one of"),
    ({"layers_at_depth": {"x": {}}}, "layers_at_depth keys are model depths"),
    ({"layers_at_depth": {"0": {}}}, "layers_at_depth keys are model depths"),
    ({"layers_at_depth": [1]}, "layers_at_depth must map a model depth"),
    ({"layers_at_depth": {"4": {"2-4": {"key": {"bits": 8}}}}}, "names layers beyond its 4 layers"),
    ({"layers": {"1": {"key": {"bits": 8}}}, "layers_at_depth": {"4": {"1": {"value": {"bits": 8}}}}},
     "is also in layers; write it once"),
    ({"layers_at_depth": {"4": {"1": {"key": {"bits": 7}}}}}, r"bits must be one of"),
    ("int5", "valid presets: none, int8, int4"),
])
def test_invalid_specs_name_the_allowed_values(bad, message):
    with pytest.raises(ValueError, match=message):
        load_spec(bad)


def test_group_size_must_divide_head_dim(tiny_llama):
    with pytest.raises(ValueError, match=r"does not divide head_dim .*allowed"):
        CompressedCache(tiny_llama, {"key": {"axis": "channel"}, "value": {"axis": "token", "group_size": 24}})


def test_layer_override_beyond_model_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="beyond the model"):
        CompressedCache(tiny_llama, {**KIVI4, "layers": {"0-99": {"key": {"bits": 8}}}})


def test_layer_overrides_merge_in_order():
    spec = load_spec({**KIVI4, "layers": {"0-2": {"value": {"bits": 8}}, "2": {"value": {"method": "none"}}}})
    assert spec.for_layer(0)[1].bits == 8
    assert spec.for_layer(2)[1].method == "none"
    assert spec.for_layer(3) == (spec.key, spec.value)


def test_depth_tables_apply_only_at_their_depth(tiny_llama):
    """`layers_at_depth` {"2": ...} changes a 2-layer model's cache (tiny_llama has 2 layers), and
    nothing on a model of another depth; it merges after `layers`."""
    spec = load_spec({**KIVI4, "layers": {"0": {"value": {"bits": 8}}},
                      "layers_at_depth": {"2": {"0-1": {"value": {"bits": 2}}}, "3": {"2": {"key": {"bits": 8}}}}})
    assert spec.at_depth(2).layers == {"0": {"value": {"bits": 8}}, "0-1": {"value": {"bits": 2}}}
    assert spec.at_depth(2).for_layer(0)[1].bits == 2 and spec.at_depth(2).layers_at_depth == {}
    assert spec.at_depth(5).for_layer(0)[1].bits == 8 and spec.at_depth(5).for_layer(2)[0].bits == 4
    assert spec.at_depth(3).for_layer(2)[0].bits == 8
    cache = CompressedCache(tiny_llama, spec)
    assert [layer.value_codec.bits for layer in cache.layers] == [2, 2]
    assert "on a model of 2 layers" in spec.describe()
    built = CacheSpec(key=spec.key, value=spec.value, layers_at_depth={2: {"1": {"key": {"bits": 8}}}})
    assert built.at_depth(2).for_layer(1)[0].bits == 8  # a depth given as a number in Python


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_files_round_trip(tmp_path, suffix):
    spec = load_spec({**KIVI4, "key": {"bits": 2}, "layers": {"1": {"key": {"bits": 8}}}, "name": "mine",
                      "layers_at_depth": {"30": {"3-4": {"value": {"bits": 8}}}}})
    path = tmp_path / f"spec{suffix}"
    spec.save(path)
    assert load_spec(str(path)) == spec


def test_broken_spec_file_is_a_clear_error(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_spec(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_spec(str(tmp_path / "missing.json"))


def test_registry_refuses_duplicates():
    registry = Registry()
    registry.register("a", "first", lambda: CacheSpec())
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", "again", lambda: CacheSpec())
    assert "int4" in PRESETS.names()
