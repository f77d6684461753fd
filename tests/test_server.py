"""`kvggml serve`: llama-cpp-python's OpenAI-compatible server on the patched library, as a client drives it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from conftest import child_env
from servers import free_port, request, running

from kvggml import native

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
    # /metrics: the same figures in Prometheus' format, as llama-server gives them
    with urllib.request.urlopen(f"{server}/metrics", timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    metrics = native.parse_metrics(text)
    for name in ("compressed_tokens", "compressed_bytes", "blocks", "exact_cells"):
        assert float(metrics[f"kvggml:{name}"]) == stats[name], name
    assert float(metrics['kvggml:seq_compressed_tokens{seq="0"}']) == stats["compressed_tokens"]


@pytest.mark.parametrize(
    "body",
    [b'{"messages": [', b'{"messages": "not a list"}', b'{"messages": [], "temperature": "warm"}', b"[1, 2]"],
)
def test_a_malformed_request_gets_400_not_500(server, body):
    # llama-cpp-python alone answers each of these with 500 (kvggml.cli.answer_client_errors)
    req = urllib.request.Request(
        f"{server}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    assert json.load(err.value)["error"]["type"] == "invalid_request_error"


def test_a_stream_runs_to_its_end_while_another_request_waits(server):
    # llama-cpp-python's default (interrupt_requests) would end the stream at the second request,
    # leaving its chunked body unterminated
    body = {"messages": [{"role": "user", "content": "Count from one to forty."}], "max_tokens": 48, "stream": True}
    req = urllib.request.Request(
        f"{server}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    events, replies, other = [], [], None
    with urllib.request.urlopen(req, timeout=300) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(line.removeprefix(b"data: ").strip())
                if other is None:  # the stream is under way: another client asks meanwhile
                    other = threading.Thread(
                        target=lambda: replies.append(chat(server, [{"role": "user", "content": "Hi"}]))
                    )
                    other.start()
    other.join()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(chunks) > 2 and replies and replies[0]["choices"][0]["message"]["content"]


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
