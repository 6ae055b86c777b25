"""Batch generation with a compressed cache: prompts from a JSONL file, one output line per prompt.

    summary = generate_file("prompts.jsonl", "out.jsonl", GenerateSettings(spec="int4", max_new_tokens=64))

Input lines `{"id", "prompt"}`; output lines `{"id", "line", "status", "text", "prompt_tokens",
"new_tokens", "stored_bytes", "fp16_bytes", "ratio", "prompt_key", "run"}` (or an error for that prompt
only) and a summary line per run. Greedy decoding, a fresh `CompressedCache` per prompt, no chat
template. A rerun reuses lines with the same prompt text and settings and refuses a file of other
settings or an output that is the input. The prompts run on an executor (`executor.Local` here by
default, `distributed.RayExecutor` on a cluster), which never changes a line. Details: docs/ray.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .executor import Executor, Local
from .io import content_hash, write_text_atomic
from .fingerprint import text_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSettings:
    """What shapes an output line besides the prompt.

    Attributes:
        spec: preset name, spec file path, or spec dict.
        max_new_tokens: greedy tokens per prompt.
        model, dtype, device: how the model is loaded (see `kvcompress.models.load_model`).
        artifact: calibration artifact folder for low-rank specs (None: the embedded model's).
    """

    spec: Any = "int4"
    max_new_tokens: int = 64
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    artifact: str | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class Prompt:
    id: str
    line: int
    prompt: str | None = None
    error: str | None = None  # set when the input line itself is bad

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Tally:
    ok: int = 0
    errors: int = 0
    stored_bytes: int = 0
    fp16_bytes: int = 0
    ids: list = field(default_factory=list)

    def add(self, line: dict) -> None:
        if line["status"] == "ok":
            self.ok += 1
            self.stored_bytes += line["stored_bytes"]
            self.fp16_bytes += line["fp16_bytes"]
        else:
            self.errors += 1


# --------------------------------------------------------------------------- files


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Every non-blank line of `path` as a Prompt; a malformed line gets `error` set (naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--input {path}: not UTF-8 text (byte {err.start}); pass a UTF-8 JSONL file, one "
                         '{"id": ..., "prompt": ...} per line') from None
    prompts, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(raw)
        except ValueError as err:
            prompts.append(Prompt(f"line-{number}", number, error=f"{where}: not valid JSON ({err})"))
            continue
        if not isinstance(data, dict):
            prompts.append(Prompt(f"line-{number}", number, error=f"{where}: expected a JSON object"))
            continue
        pid = str(data.get("id", f"line-{number}"))
        text = data.get("prompt", data.get("text"))
        if pid in seen:
            prompts.append(Prompt(f"{pid}@line-{number}", number, error=f"{where}: id {pid!r} repeats an earlier line"))
            continue
        seen.add(pid)
        if not isinstance(text, str) or not text:
            prompts.append(Prompt(pid, number, error=f"{where}: needs a non-empty string field 'prompt'"))
            continue
        prompts.append(Prompt(pid, number, prompt=text))
    return prompts


def run_settings(settings: GenerateSettings, spec) -> dict:
    """What shapes an output line besides its prompt: the resolved spec, the model and the decoding."""
    return {"spec": spec.to_dict(), "model": settings.model or "embedded", "dtype": settings.dtype,
            "artifact": settings.artifact, "max_new_tokens": settings.max_new_tokens, "decoding": "greedy"}


def prompt_key(prompt: Prompt) -> str:
    """Hash of a prompt's text (of its input error for a bad line): what a finished line must match."""
    return content_hash(prompt.prompt if prompt.error is None else ["error", prompt.error])


def read_output(path: str | os.PathLike) -> list[dict]:
    """The JSON object lines of an output file ([] if it does not exist; a torn or bad line is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            lines.append(data)
    return lines


def _check_same_run(lines: list[dict], run: str, settings: dict, path: Path) -> None:
    """Refuse an output file with finished lines of another run (other spec, model or decoding)."""
    foreign = [line for line in lines if line.get("status") == "ok" and line.get("run") != run]
    if not foreign:
        return
    before = next((line["summary"].get("settings") for line in reversed(lines)
                   if isinstance(line.get("summary"), dict) and line["summary"].get("settings")), None)
    differ = [k for k in settings if before is not None and before.get(k) != settings[k]]
    what = (f"its {' and '.join(differ)} {'differs' if len(differ) == 1 else 'differ'} from this run's" if differ
            else "written with other settings or by an older kvcompress")
    raise ValueError(f"--output {path} holds {len(foreign)} results of another run ({what}); pass another --output, "
                     "or delete the file to generate every prompt again")


def resume_lines(prompts: list[Prompt], lines: list[dict], run: str) -> dict[str, dict]:
    """Prompt id -> its finished line: an "ok" line of this run for the same prompt text, wherever it
    was in the input (its "id" and "line" are the prompt's now, so an inserted line moves nothing)."""
    finished = {}
    for line in lines:
        if line.get("status") == "ok" and line.get("run") == run:
            finished.setdefault(line.get("prompt_key"), line)
    done = {}
    for prompt in prompts:
        line = finished.get(prompt_key(prompt)) if prompt.error is None else None
        if line is not None:
            done[prompt.id] = {**line, "id": prompt.id, "line": prompt.line}
    return done


class _Output:
    """Rewrites the file with the lines `kept` (atomically), then appends one JSON line per write,
    flushed at once."""

    def __init__(self, path: str | os.PathLike, kept: list[dict]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, data: dict) -> None:
        self.file.write(json.dumps(data) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------- generating


def load_from_settings(settings: GenerateSettings):
    """(model, tokenizer) named by `settings.model`, `settings.dtype` and `settings.device`."""
    from .models import DTYPES, load_model

    return load_model(settings.model, dtype=DTYPES[settings.dtype], device=settings.device)


class Generator:
    """A loaded model and a spec; `__call__` turns one Prompt into one output line (never raises for a prompt)."""

    def __init__(self, settings: GenerateSettings, model=None, tokenizer=None, loader: Callable | None = None):
        from .calibration import artifact_for
        from .presets import load_spec

        if model is None:
            model, tokenizer = (loader or load_from_settings)(settings)
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.spec = load_spec(settings.spec)
        self.artifact = artifact_for(model, self.spec, settings.artifact)
        self.context = getattr(text_config(model), "max_position_embeddings", None)

    def __call__(self, prompt: Prompt) -> dict:
        from .cache.attention import enable_fast_attention
        from .cache.cache import CompressedCache
        from .compat import CACHE_KWARG

        head = {"id": prompt.id, "line": prompt.line}
        if prompt.error:
            return {**head, "status": "error", "error": prompt.error}
        try:
            ids = torch.tensor([self.tokenizer(prompt.prompt)["input_ids"]], dtype=torch.long)
            need = ids.shape[1] + self.settings.max_new_tokens
            if self.context is not None and need > self.context:
                return {**head, "status": "error",
                        "error": f"line {prompt.line} (id {prompt.id!r}): {ids.shape[1]} prompt tokens + "
                                 f"{self.settings.max_new_tokens} new exceed the model's context of {self.context}"}
            device = next(self.model.parameters()).device
            pad = self.model.generation_config.pad_token_id
            if pad is None:
                pad = self.model.generation_config.eos_token_id
                pad = pad[0] if isinstance(pad, list) else pad
            # kvcompress's attention where the model supports it: faster decode steps, and the prompt's
            # queries for a spec that evicts; the model is restored afterwards. The cache is built inside,
            # so it sees the model switched (and logs no hint to switch it).
            with torch.no_grad(), enable_fast_attention(self.model, strict=False):
                cache = CompressedCache(self.model, self.spec, artifact=self.artifact)
                out = self.model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                          max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                          pad_token_id=pad, **{CACHE_KWARG: cache})
            new = out[0, ids.shape[1]:].tolist()
            memory = cache.memory_report()
            return {**head, "status": "ok", "text": self.tokenizer.decode(new, skip_special_tokens=True),
                    "prompt_tokens": ids.shape[1], "new_tokens": len(new), "stored_bytes": memory.stored_bytes,
                    "fp16_bytes": memory.fp16_bytes, "ratio": round(memory.ratio, 4)}
        except Exception as exc:  # this prompt fails; the others still run
            return {**head, "status": "error", "error": f"line {prompt.line} (id {prompt.id!r}): "
                                                         f"{type(exc).__name__}: {exc}"}


@dataclass(frozen=True)
class GenerateJob:
    """The executor's job (`executor.Job`): units are Prompts, each measured by a `Generator` on the
    model the executor hands to `start`."""

    settings: GenerateSettings

    def start(self, model, tokenizer) -> Generator:
        return Generator(self.settings, model=model, tokenizer=tokenizer)

    def label(self, prompt: Prompt) -> str:
        return f"line {prompt.line} (id {prompt.id!r})"


def generate_file(input_path: str | os.PathLike, output_path: str | os.PathLike, settings: GenerateSettings, *,
                  executor: Executor | None = None, model=None, tokenizer=None, loader: Callable | None = None
                  ) -> dict:
    """Generate for every prompt of `input_path` not yet done in `output_path`; returns the summary.

    Args:
        executor: who runs the prompts, e.g. `distributed.RayExecutor` (its actors load the model);
            None: `Local` on `model` (loaded here if None).
        model, tokenizer: an already loaded model (without an executor).
        loader: `loader(settings) -> (model, tokenizer)` (default `load_from_settings`), used when
            neither an executor nor a model is given.
    """
    from .presets import load_spec

    spec = load_spec(settings.spec)  # a bad spec is an error before any model is loaded
    if Path(output_path).exists() and Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"--output {output_path} is the --input file: the results would be appended to the prompts; "
                         "pass another --output")
    prompts = read_prompts(input_path)
    settings_dict = run_settings(settings, spec)
    run = content_hash(settings_dict)
    existing = read_output(output_path)
    _check_same_run(existing, run, settings_dict, Path(output_path))
    done = resume_lines(prompts, existing, run)
    todo = [p for p in prompts if p.id not in done]
    skipped = len(prompts) - len(todo)
    if skipped:
        logger.info(f"resuming: {skipped} of {len(prompts)} prompts already in {output_path}")
    # The file keeps one line per prompt: the finished ones; error lines and lines of prompts whose text
    # changed are replaced by this run's.
    start, tally = time.perf_counter(), _Tally()
    out = _Output(output_path, [done[p.id] for p in prompts if p.id in done])
    tags = {p.id: {"prompt_key": prompt_key(p), "run": run} for p in todo}
    model_name = None
    if todo and executor is None:
        from .models import model_id

        if model is None:
            model, tokenizer = (loader or load_from_settings)(settings)
        executor, model_name = Local(model, tokenizer), model_id(model)

    def on_result(_index: int, line: dict) -> None:
        line = {**line, **tags[line["id"]]}
        out.write(line)
        tally.add(line)
        done_now = tally.ok + tally.errors
        if line["status"] == "ok":
            logger.info(f"[{done_now}/{len(todo)}] {line['id']}: {line['new_tokens']} tokens, "
                        f"ratio {line['ratio']:.2f}x")
        else:
            logger.warning(f"[{done_now}/{len(todo)}] {line['error']}")

    try:
        if todo:
            executor.map(GenerateJob(settings), todo, on_result)
        summary = {"prompts": len(prompts), "ok": tally.ok, "errors": tally.errors, "skipped": skipped,
                   "stored_bytes": tally.stored_bytes, "fp16_bytes": tally.fp16_bytes,
                   "ratio": round(tally.fp16_bytes / tally.stored_bytes, 4) if tally.stored_bytes else 0.0,
                   "spec": spec.to_dict(), "model": model_name or settings.model or "embedded",
                   "settings": settings_dict,
                   "ray": executor is not None and not isinstance(executor, Local), "wall_s": round(time.perf_counter() - start, 2)}
        out.write({"summary": summary})
    finally:
        out.close()
    return summary
