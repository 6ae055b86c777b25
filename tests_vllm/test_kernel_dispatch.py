"""Which store and attention the backend runs, decided once per process (`backend.use_triton_kernels`):
the Triton paged kernels on CUDA when Triton imports, never on the CPU platform unless asked for under
Triton's interpreter, never with KVCOMPRESS_KERNELS=torch or cpu. No engine is started: the platform
is replaced by a stand-in that says whether it is CUDA.
"""

from __future__ import annotations

import pytest

from kvcompress.integrations.vllm import backend
from kvcompress.integrations.vllm.config import ServingSpecError


class Platform:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def is_cuda(self) -> bool:
        return self.cuda

    def is_cpu(self) -> bool:
        return not self.cuda


@pytest.fixture
def decide(monkeypatch):
    """decide(cuda, kernels, interpret, triton=True) -> backend.use_triton_kernels() under those settings."""
    def run(cuda: bool, kernels: str | None, interpret: bool, triton: bool = True) -> bool:
        monkeypatch.setattr(backend, "current_platform", Platform(cuda))
        monkeypatch.setattr(backend, "triton_installed", lambda: triton)
        for name, value in (("KVCOMPRESS_KERNELS", kernels), ("TRITON_INTERPRET", "1" if interpret else None)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        backend.use_triton_kernels.cache_clear()
        try:
            return backend.use_triton_kernels()
        finally:
            backend.use_triton_kernels.cache_clear()
    return run


def test_cuda_runs_triton_unless_told_otherwise_or_triton_is_missing(decide):
    assert decide(cuda=True, kernels=None, interpret=False)
    assert decide(cuda=True, kernels="triton", interpret=False)
    assert not decide(cuda=True, kernels="torch", interpret=False)
    assert not decide(cuda=True, kernels="cpu", interpret=False)
    assert not decide(cuda=True, kernels=None, interpret=False, triton=False)  # a warning, then the torch path


def test_the_cpu_platform_runs_triton_only_when_asked_under_the_interpreter(decide):
    assert not decide(cuda=False, kernels=None, interpret=True)
    assert not decide(cuda=False, kernels="auto", interpret=False)
    assert decide(cuda=False, kernels="triton", interpret=True)
    with pytest.raises(ServingSpecError, match="needs TRITON_INTERPRET=1"):
        decide(cuda=False, kernels="triton", interpret=False)
