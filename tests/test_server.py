"""`kvggml serve`: llama-cpp-python's OpenAI-compatible server on the patched library, as a client drives it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import child_env
from servers import free_port, request, running

THRESHOLD, SINKS, BLOCK = 32, 4, 16  # the window the server runs with, the default sinks and block size


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a running `kvggml serve`; the server is stopped after the module's tests."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvggml.cli", "serve", "--port", str(port), "--threads", "2", "--ctx", "2048"]
    env = child_env(OLLAMA_KV_COMPRESSION_THRESHOLD=str(THRESHOLD))
    with running(cmd, env, tmp_path_factory.mktemp("server") / "stderr.txt", "/v1/models", port) as url:
        yield url


def chat(url: str, messages: list[dict]) -> dict:
    return request(f"{url}/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 32})


def test_multi_turn_chat_completions_compress_the_cache(server):
    messages = [
        {
            "role": "user",
            "content": "Write two sentences about the sea, and say why so many people "
            "love to spend their holidays on its shores.",
        }
    ]
    first = chat(server, messages)
    reply = first["choices"][0]["message"]
    assert reply["role"] == "assistant" and len(reply["content"].split()) >= 3
    # past the window and the sinks by at least a block: something had to be compressed
    assert first["usage"]["total_tokens"] > THRESHOLD + SINKS + BLOCK

    messages += [reply, {"role": "user", "content": "Now two sentences about mountains."}]
    second = chat(server, messages)
    assert len(second["choices"][0]["message"]["content"].split()) >= 3
    assert second["usage"]["prompt_tokens"] > first["usage"]["total_tokens"]

    stats = request(f"{server}/kvggml/stats")
    assert stats["enabled"] == 1
    assert stats["compressed_tokens"] > 0 and stats["blocks"] * BLOCK == stats["compressed_tokens"]
    # everything older than the window (after the sinks) is in whole blocks
    exact_limit = stats["n_tokens"] - SINKS - THRESHOLD
    assert exact_limit - BLOCK < stats["compressed_tokens"] <= exact_limit


def test_serve_reports_a_bad_variable_before_loading():
    res = subprocess.run(
        [sys.executable, "-m", "kvggml.cli", "serve", "--port", str(free_port())],
        env=child_env(OLLAMA_KV_COMPRESSION_PRESET="best"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "kvggml serve: error: OLLAMA_KV_COMPRESSION_PRESET='best'" in res.stderr
