"""Step 1 of tuning: the sensitivity of every layer's K and V to each candidate setting.

A cheap proxy (attention-output error with real queries, from one captured forward pass) and
the real bytes each setting stores per token, plus per-tensor weights calibrated by two
decode-faithful evaluations (see `tune` for the method). This module does not choose an
allocation (see `allocation`) and does not verify anything.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..executor import Executor, Local
from ..spec import CacheSpec, TensorSpec
from ..fingerprint import model_fingerprint, text_fingerprint
from .state import TuneState, measurement_fingerprint

logger = logging.getLogger(__name__)

TENSORS = ("key", "value")
COST_POWER = 2.0  # the proxy cost is the attention-output relative error to this power
Evaluator = Callable[[CacheSpec], dict]  # spec -> decode-faithful figures ("kl", "ppl_change", "ratio", ...)

def probe_specs(settings: dict[str, list[TensorSpec]], base: CacheSpec) -> list[CacheSpec]:
    """Uniform specs that between them apply every candidate to K and to V (K[i] with V[i])."""
    n = max(len(settings["key"]), len(settings["value"]))
    none = TensorSpec(method="none")
    out = []
    for i in range(n):
        key = settings["key"][i] if i < len(settings["key"]) else none
        value = settings["value"][i] if i < len(settings["value"]) else none
        out.append(dataclasses.replace(base, key=key, value=value, layers={}, layers_at_depth={},
                                       name=f"probe{i}"))
    return out


@dataclass
class Sensitivity:
    """Proxy cost and real bytes of every (layer, tensor, setting).

    Attributes:
        settings: {"key": [TensorSpec, ...], "value": [...]}: the candidates (index s below).
        cost: {"key": (L, S_key) tensor, "value": (L, S_value)}: attention-output relative error
            squared when only that tensor of that layer is coded with setting s.
        nbytes: same shapes: bytes stored per compressed token (all KV heads of the layer).
    """

    settings: dict[str, list[TensorSpec]]
    cost: dict[str, torch.Tensor]
    nbytes: dict[str, torch.Tensor]

    @property
    def num_layers(self) -> int:
        return self.cost["key"].shape[0]

    def to_dict(self) -> dict:
        return {"settings": {t: [s.to_dict() for s in self.settings[t]] for t in TENSORS},
                "cost": {t: self.cost[t].tolist() for t in TENSORS},
                "bytes_per_token": {t: self.nbytes[t].tolist() for t in TENSORS}}


def _probe_result(memory: dict, metrics: dict, power: float) -> dict:
    """Per-layer costs and bytes per compressed token of one probe (see `Sensitivity`)."""
    out: dict[str, list[float]] = {"key_cost": [], "value_cost": [], "key_bytes": [], "value_bytes": []}
    for layer_metrics, layer_memory in zip(metrics["layers"], memory["layers"]):
        n = layer_memory["compressed_tokens"]
        for tensor, variant in (("key", "key_only"), ("value", "value_only")):
            out[f"{tensor}_cost"].append(layer_metrics["attention"][variant]["rel_error"] ** power)
            stored = sum(v for k, v in layer_memory["parts"].items() if k.startswith(f"{tensor}_"))
            out[f"{tensor}_bytes"].append(stored / n)
    return out


def probe_fingerprint(model_fp: dict, text_fp: dict, cost_power: float) -> dict:
    """The fingerprint a probe's result is saved under (model, tuning text, versions and the cost power)."""
    return {**measurement_fingerprint(model_fp, text_fp), "cost_power": cost_power}


def measure_probe(model, probe: CacheSpec, capture, *, artifact=None, cost_power: float = COST_POWER) -> dict:
    """One probe's per-layer costs and bytes (see `_probe_result`) from captured Q, K, V
    (`reconstruction.capture_states`)."""
    from ..measure.reconstruction import reconstruct, reconstruction_metrics

    pairs, memory = reconstruct(model, probe, capture, artifact=artifact)
    metrics = reconstruction_metrics(capture, pairs, sinks=memory["sinks"])
    return _probe_result(memory, metrics, cost_power)


@dataclass(frozen=True)
class ProbeJob:
    """Probe specs -> `measure_probe` results (a `Job`, see `kvcompress.executor`); Q, K, V of
    `input_ids` (1, T) are captured once per start, before the first probe."""

    input_ids: torch.Tensor
    artifact: object = None
    cost_power: float = COST_POWER

    def start(self, model, tokenizer=None):
        from ..measure.reconstruction import capture_states

        capture = None

        def measure(probe: CacheSpec) -> dict:
            nonlocal capture
            if capture is None:
                start = time.perf_counter()
                capture = capture_states(model, self.input_ids)
                logger.info(f"captured Q, K, V of {self.input_ids.shape[1]} tokens "
                            f"({time.perf_counter() - start:.1f} s)")
            return measure_probe(model, probe, capture, artifact=self.artifact, cost_power=self.cost_power)

        return measure

    def label(self, probe: CacheSpec) -> str:
        return f"probe K {probe.key.describe()}, V {probe.value.describe()}"


def measure_sensitivity(model, input_ids: torch.Tensor, settings: dict[str, list[TensorSpec]], base: CacheSpec,
                        *, state: TuneState | None = None, text_fp: dict | None = None, artifact=None,
                        cost_power: float = COST_POWER, executor: Executor | None = None) -> Sensitivity:
    """Proxy cost and real bytes of every candidate on every layer (see module doc, step 1).

    Args:
        input_ids: (1, T) tuning text; T must hold the sinks and at least one block.
        settings: candidates per tensor (see `candidate_settings`).
        base: supplies sinks and block_size (the window is set to 0 for the probes).
        executor: runs the probes not saved in `state` (default: here, `executor.Local`).
    """
    state = state or TuneState(None)
    executor = executor or Local(model)
    fingerprint = probe_fingerprint(model_fingerprint(model), text_fp or text_fingerprint(input_ids), cost_power)
    probes = probe_specs(settings, base)
    started = time.perf_counter()

    def measured(probe: CacheSpec, _result: dict) -> None:
        logger.info(f"sensitivity: K {probe.key.describe()}, V {probe.value.describe()} "
                    f"({time.perf_counter() - started:.1f} s)")

    results = state.measured("probe", fingerprint, probes,
                             partial(executor.map, ProbeJob(input_ids, artifact, cost_power)), measured)
    cost, nbytes = {}, {}
    for tensor in TENSORS:
        n = len(settings[tensor])
        cost[tensor] = torch.tensor([results[i][f"{tensor}_cost"] for i in range(n)], dtype=torch.float64).T
        nbytes[tensor] = torch.tensor([results[i][f"{tensor}_bytes"] for i in range(n)], dtype=torch.float64).T
    return Sensitivity(settings, cost, nbytes)


def weight_specs(sens: Sensitivity, base: CacheSpec) -> dict[str, tuple[int, CacheSpec]]:
    """{"key"|"value": (setting index, uniform spec coding only that tensor with it)}: the two
    decode-faithful evaluations `calibrate_tensor_weights` needs (a tensor without a lossy
    candidate is left out). The setting is the tensor's second-cheapest lossy candidate by bytes."""
    none = TensorSpec(method="none")
    out = {}
    for tensor in TENSORS:
        lossy = [i for i, s in enumerate(sens.settings[tensor]) if s.method != "none"]
        if not lossy:
            continue
        by_bytes = sorted(lossy, key=lambda i: sens.nbytes[tensor][:, i].sum().item())
        pick = by_bytes[1] if len(by_bytes) > 1 else by_bytes[0]
        setting = sens.settings[tensor][pick]
        out[tensor] = (pick, dataclasses.replace(base, key=setting if tensor == "key" else none,
                                                 value=setting if tensor == "value" else none, layers={},
                                                 name=f"{tensor}-only"))
    return out


def calibrate_tensor_weights(sens: Sensitivity, base: CacheSpec, evaluate_all: Callable[[list[CacheSpec]], list[dict]]
                             ) -> tuple[Sensitivity, dict]:
    """Scale the proxy costs of K and of V so that each predicts the measured KL (see module doc, step 1b).

    The attention-output error treats an error in K and one in V alike, but they do not cost
    the same downstream (docs/tuning.md has the figures for SmolLM2-135M). So for each tensor, one uniform spec
    codes only that tensor (the other kept in full precision) with its second-cheapest candidate,
    and its decode-faithful KL on the tuning text divided by the summed proxy cost is that
    tensor's weight (`evaluate_all(specs)` -> figures of each, e.g. `SavedEvaluator.map`).
    Returns the reweighted sensitivities and {"key"|"value": {"setting", "kl", "proxy", "weight"}}.
    """
    cost, info = {}, {}
    specs = weight_specs(sens, base)
    kls = dict(zip(specs, (figures["kl"] for figures in evaluate_all([spec for _, spec in specs.values()]))))
    for tensor in TENSORS:
        if tensor not in specs:
            cost[tensor] = sens.cost[tensor]
            continue
        pick, _ = specs[tensor]
        setting = sens.settings[tensor][pick]
        kl = kls[tensor]
        proxy = sens.cost[tensor][:, pick].sum().item()
        weight = kl / proxy if kl > 0 and proxy > 0 else 1.0
        cost[tensor] = sens.cost[tensor] * weight
        info[tensor] = {"setting": setting.to_dict(), "kl": kl, "proxy": proxy, "weight": weight}
        logger.info(f"{tensor} only at {setting.describe()}: KL {kl:.4f} for proxy {proxy:.4f}: weight {weight:.3g}")
    return Sensitivity(sens.settings, cost, sens.nbytes), info
