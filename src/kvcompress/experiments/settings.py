"""What shapes a sweep record besides its spec: `SweepSettings` and the record key.

This module does not measure or write anything (see `measuring`, `sweep`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..io import content_hash
from ..measure.tasks import PASSKEY_DEPTHS, PASSKEY_LENGTHS, PROMPT_FORMATS
from .grid import SpecEntry

TASKS = ("passkey", "agreement")
RECORD_FORMAT = 2  # 2: keys include the fingerprint (versions, weights hash, texts)
_TASK_SETTINGS = ("tasks", "passkey_lengths", "passkey_depths", "passkey_format", "seed", "agreement_prompts",
                  "agreement_prompt_tokens", "agreement_new_tokens", "agreement_dataset")


@dataclass(frozen=True)
class SweepSettings:
    """Everything besides the spec that shapes a record (defaults, then files, then CLI flags).

    Attributes:
        model: model name/path for `load_model` (None: the embedded SmolLM2-135M-Instruct).
        dtype, device: how the model is loaded.
        corpus: a UTF-8 text file whose report part (split like the embedded corpus, see `corpus`)
            is evaluated on (None: the report part of the kind `text`).
        text: the kind of text (`corpus.KINDS`) whose report part is read when `corpus` is None
            (None: "docs", the embedded corpus). Left out of `to_dict` when None.
        eval_tokens: tokens of decode-faithful evaluation (with `context_tokens`: continuation tokens).
        context_tokens: None (decode-faithful evaluation of `eval_tokens` tokens) or N: prompt
            compression instead (`measure.prompt`: N tokens prefilled at once, then `eval_tokens`
            teacher-forced and scored). Left out of `to_dict` when None, so records of sweeps
            without it keep their keys.
        recon_tokens: tokens captured for direct reconstruction.
        tasks: names from TASKS to run (on the entries whose `tasks` flag is set).
        passkey_lengths, passkey_depths, passkey_format, seed: see `tasks.passkey_cases`.
        agreement_prompts, agreement_prompt_tokens, agreement_new_tokens: generation agreement.
        agreement_dataset: a `datasets` name whose "text" column gives the agreement prompts
            (needs the library and hub access; None: the evaluation text).
        artifact: calibration artifact folder for low-rank specs (None: the embedded model's).
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    corpus: str | None = None
    text: str | None = None
    eval_tokens: int = 1024
    recon_tokens: int = 512
    tasks: tuple[str, ...] = ()
    passkey_lengths: tuple[int, ...] = PASSKEY_LENGTHS
    passkey_depths: tuple[float, ...] = PASSKEY_DEPTHS
    passkey_format: str = "plain"
    seed: int = 0
    agreement_prompts: int = 4
    agreement_prompt_tokens: int = 256
    agreement_new_tokens: int = 32
    agreement_dataset: str | None = None
    artifact: str | None = None
    context_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "passkey_lengths", tuple(int(x) for x in self.passkey_lengths))
        object.__setattr__(self, "passkey_depths", tuple(float(x) for x in self.passkey_depths))
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; allowed: {list(TASKS)}")
        if self.passkey_format not in PROMPT_FORMATS:
            raise ValueError(f"passkey_format must be one of {PROMPT_FORMATS}, got {self.passkey_format!r}")
        for name in ("eval_tokens", "recon_tokens", "agreement_prompts", "agreement_prompt_tokens",
                     "agreement_new_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")
        if self.text is not None:
            from ..corpus import KINDS

            if self.text not in KINDS:
                raise ValueError(f"text must be one of {', '.join(KINDS)} (or None), got {self.text!r}")
            if self.corpus is not None:
                raise ValueError("give either corpus (a text file) or text (a kind of text), not both")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"context_tokens must be None or at least 1, got {self.context_tokens}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("tasks", "passkey_lengths", "passkey_depths"):
            out[name] = list(out[name])
        for name in ("context_tokens", "text"):
            if out[name] is None:
                del out[name]
        return out

    def baseline_dict(self) -> dict:
        """The settings the uncompressed task figures depend on."""
        keep = ("model", "dtype", "device", "corpus", "text", "tasks", "passkey_lengths", "passkey_depths",
                "passkey_format", "seed", "agreement_prompts", "agreement_prompt_tokens", "agreement_new_tokens",
                "agreement_dataset")
        return {k: v for k, v in self.to_dict().items() if k in keep}


def record_key(entry: SpecEntry, settings: SweepSettings, fingerprint: dict | None = None) -> str:
    """Hash of what shapes the record: the resolved spec, the settings, whether tasks run on it, and
    the run's fingerprint (versions, model weights hash, texts; see `measuring.sweep_fingerprint`)."""
    shaping = settings.to_dict()
    if not (entry.tasks and settings.tasks):  # task settings do not shape a record without tasks
        shaping = {k: v for k, v in shaping.items() if k not in _TASK_SETTINGS}
    if not entry.eval:
        shaping.pop("eval_tokens")
        shaping.pop("context_tokens", None)
    payload = {"format": RECORD_FORMAT, "spec": entry.spec.to_dict(), "settings": shaping,
               "tasks": list(settings.tasks) if entry.tasks else [], "eval": entry.eval, "fingerprint": fingerprint}
    return content_hash(payload)
