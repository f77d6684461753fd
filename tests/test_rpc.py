"""Compression with llama.cpp's RPC backend: the model's layers on another process (`ggml-rpc-server`,
the patched build's, standing in for another machine), the KV cache and the tier in this one.

The tier reads and writes the cache's cells in host memory and adds ops that call into libllama.
So the cache must stay on the CPU (`-nkvo`), and the tier's ops must run there too: sent to the
RPC server, a custom op's function pointer crashed it (once, before those ops were placed).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import PATCHED, child_env
from servers import free_port

from kvggml.library import library_dir
from kvggml.model import default_model_path, default_text

ON = {"OLLAMA_KV_COMPRESSION": "1", "OLLAMA_KV_COMPRESSION_THRESHOLD": "64"}
PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


@contextlib.contextmanager
def rpc_server(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    """ggml-rpc-server on a free port: its endpoint, once it accepts connections, and its process."""
    port = free_port()
    log = tmp_path / "rpc-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(library_dir(PATCHED) / "ggml-rpc-server"), "-p", str(port)], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"ggml-rpc-server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ggml-rpc-server did not listen within 60 s:\n{log.read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def perplexity(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    # micro-batches of 32 take the direct path once blocks exist; 2 chunks of 512 past a 64-token window
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text(default_text())
    cmd = [str(library_dir(PATCHED) / "llama-perplexity"), "-m", str(default_model_path()), "-f", str(text)]
    cmd += ["-c", "512", "-b", "32", "-ub", "32", "--chunks", "2", "-t", "2", "-v", *extra]
    return subprocess.run(cmd, env=child_env(**ON), capture_output=True, text=True, timeout=600)


def test_layers_on_an_rpc_server_give_the_same_perplexity_with_the_cache_kept_here(tmp_path):
    local = perplexity(tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    with rpc_server(tmp_path) as (endpoint, server):
        remote = perplexity(tmp_path, "--rpc", endpoint, "-ngl", "99", "-nkvo")
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert server.poll() is None  # the server lived through it
    assert "layer  29 assigned to device RPC0" in remote.stderr  # every layer was the server's
    # the same kernels on the same CPU, in another process: the same numbers
    assert PPL.search(remote.stdout + remote.stderr).group(1) == PPL.search(local.stdout + local.stderr).group(1)


def test_a_cache_offloaded_to_an_rpc_server_is_refused_and_names_the_way_out(tmp_path):
    with rpc_server(tmp_path) as (endpoint, server):
        res = perplexity(tmp_path, "--rpc", endpoint, "-ngl", "99")
        assert res.returncode != 0
        assert "OLLAMA_KV_COMPRESSION=1 needs the KV cache in host memory" in res.stderr
        assert "--no-kv-offload, -nkvo" in res.stderr
        assert server.poll() is None


@pytest.mark.parametrize("flash_attn", ["1", "0"])
def test_decode_on_an_rpc_server_runs_the_tiers_ops_here(tmp_path, flash_attn):
    # one token at a time at depth: the direct path's ops, which crashed the server when sent there
    model = str(default_model_path())
    with rpc_server(tmp_path) as (endpoint, server):
        res = subprocess.run(
            [str(library_dir(PATCHED) / "llama-bench"), "-m", model, "--rpc", endpoint, "-ngl", "99", "-nkvo", "1",
             "-p", "0", "-n", "8", "-d", "256", "-r", "1", "-t", "2", "-fa", flash_attn, "-o", "json"],
            env=child_env(**ON), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.poll() is None
