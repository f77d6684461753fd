"""kvggml's API called from another thread while the context decodes (docs/API.md, "Threads"): every
read is one consistent state, the callback runs on the decoding thread, nothing crashes.

`make tsan` runs this file on the ThreadSanitizer build, where a data race fails the child process.
"""

from __future__ import annotations

from conftest import child_env, last_json, run_script

SINKS, BLOCK, THRESHOLD = 4, 16, 32
# a small window and a schedule: blocks are encoded and coarsened in most micro-batches while they are read
ON = {
    "OLLAMA_KV_COMPRESSION": "1",
    "OLLAMA_KV_COMPRESSION_THRESHOLD": str(THRESHOLD),
    "OLLAMA_KV_COMPRESSION_SCHEDULE": "32:6.4.3.3.0,96:6.4.3.0.0",
}
# small enough for ThreadSanitizer, which runs the model about 50 times slower (a few minutes)
N_CTX, TOKENS, BATCH = 512, 256, 16


def test_another_thread_reads_consistent_states_while_the_context_decodes():
    out = last_json(run_script("threads", str(N_CTX), str(TOKENS), str(BATCH), env=child_env(**ON), timeout=1200))
    assert out["errors"] == []
    # the reads overlapped the decodes: the reader saw the cache at many sizes, not just before and after
    assert out["reads"] >= out["decodes"] and out["distinct_block_counts"] >= 8, out
    stats = out["stats"]
    assert stats["compressed_tokens"] == stats["blocks"] * BLOCK == (TOKENS - SINKS - THRESHOLD) // BLOCK * BLOCK
    assert out["encoded"] == stats["blocks"] and out["coarsened"] == stats["coarsenings"] > 0
    assert out["callback_threads"] == ["MainThread"] and out["callback_errors"] == []
