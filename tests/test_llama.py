"""`kvggml.Llama` as a Python user drives it: `.compression`, llama-cpp-python's own state
saving and prefix reuse, on the default model and the patched library (tests/scripts/llama_user.py)."""

from __future__ import annotations

from conftest import child_env, last_json, run_script


def test_python_layer_drives_compression_state_and_prefix_reuse():
    out = last_json(run_script("llama_user", env=child_env(OLLAMA_KV_COMPRESSION_THRESHOLD="256")))
    n_blocks = (1200 - 4 - 256) // 16
    # the callback saw each block as it was compressed, and the segments are those blocks
    assert out["events"] == [[4 + 16 * k, 20 + 16 * k] for k in range(n_blocks)]
    assert [s[:2] for s in out["segments"]] == out["events"] and out["stats"]["blocks"] == n_blocks
    assert out["settings"] == {"threshold": 256, "sinks": 4, "level": 4, "recent_capacity": 260, "preset": "balanced"}
    assert out["same_after_load_state"]
    # prefix reuse removed everything from position 500 on, compressed or not, then read the new
    # tokens with the 64-token window set through .compression.configure
    assert out["n_tokens"] == 600 + 8 - 1  # the last of the 8 new tokens is sampled, not yet read
    assert len(out["reply"].strip()) > 0
    assert out["after_reuse"]["compressed_tokens"] == (out["n_tokens"] - 4 - 64) // 16 * 16
