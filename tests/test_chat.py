"""`kvggml chat` and `kvggml.Llama` on the patched library, as a user drives them."""

from __future__ import annotations

import re
import subprocess

from conftest import child_env, run_cli

TURNS = "Hello! Who are you?\nWrite two sentences about the sea.\nNow two about mountains.\n"


def chat(extra_env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_cli(
        "chat",
        "--max-tokens",
        "40",
        "--temperature",
        "0",
        "--threads",
        "2",
        *args,
        env=child_env(**extra_env),
        input=TURNS,
    )


def test_multi_turn_chat_compresses_past_the_threshold_and_shows_it():
    res = chat({"OLLAMA_KV_COMPRESSION_THRESHOLD": "32"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compression on (balanced)" in res.stdout
    replies = re.findall(r"assistant> (.+)", res.stdout)
    assert len(replies) == 3 and all(len(r.split()) >= 3 for r in replies)
    status = [
        (int(a), int(b), int(c))
        for a, b, c in re.findall(r"\[(\d+) tokens in context .* (\d+) tokens in (\d+) compressed blocks\]", res.stdout)
    ]
    assert len(status) == 3
    # the context grows turn after turn (prefix reuse keeps it), and so does the compressed part
    assert status[0][0] < status[1][0] < status[2][0]
    assert 0 < status[0][1] < status[2][1] and status[2][1] == 16 * status[2][2]
    # everything older than the 32-token window (after 4 sinks) is in whole blocks
    assert status[2][0] - 4 - 32 - 16 < status[2][1] <= status[2][0] - 4 - 32


def test_chat_without_compression_says_so():
    res = chat({}, "--no-compression")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compression off" in res.stdout and "compressed blocks" not in res.stdout


def test_chat_reports_a_bad_variable():
    res = chat({"OLLAMA_KV_COMPRESSION_SINKS": "-1"})
    assert res.returncode == 2
    assert "OLLAMA_KV_COMPRESSION_SINKS='-1' is out of range: expected an integer from 0 to 4096" in res.stderr


def test_chat_reports_an_unknown_chat_format_before_loading():
    res = chat({}, "--chat-format", "nonsense")
    assert res.returncode == 2
    assert "kvggml chat: error: --chat-format: Invalid chat handler: nonsense (valid formats: [" in res.stderr
    assert "Traceback" not in res.stderr
