"""The kvcompress plugin for vLLM: serve a kvcompress spec from packed pages of vLLM's KV pool.

Turned on by the environment variable KVCOMPRESS_VLLM_SPEC (a preset name or a spec file; see
`config`); without it `register` does nothing and vLLM runs unchanged. vLLM calls `register` in
every process it starts (entry point group `vllm.general_plugins` in pyproject.toml). On CPU the
backend (`backend`) replaces CPU_ATTN; on CUDA it registers as CUSTOM (`--attention-backend CUSTOM`).
This module imports vLLM only inside `register`.
"""

from __future__ import annotations

import logging

from .config import ENV, configured_spec, configured_text

BACKEND = "kvcompress.integrations.vllm.backend.KvcompressAttentionBackend"
logger = logging.getLogger("vllm.kvcompress")  # a child of vLLM's logger: printed in vLLM's format


def register() -> None:
    """vLLM's plugin hook: register the kvcompress backend if KVCOMPRESS_VLLM_SPEC names a servable spec.

    Raises `config.ServingSpecError` (one line) for a spec that does not exist or cannot be served.
    """
    spec = configured_spec()
    if spec is None:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():  # the CPU platform always picks CPU_ATTN
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
        where = "in place of CPU_ATTN"
    else:
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND)
        where = "as CUSTOM (select it with --attention-backend CUSTOM)"
    logger.info("kvcompress: %s=%s registered %s: %s", ENV, configured_text(), where, spec.describe())


__all__ = ["register", "configured_spec", "ENV", "BACKEND"]
