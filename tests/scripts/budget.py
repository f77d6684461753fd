"""A greedy generation that fills the context under OLLAMA_KV_COMPRESSION_BUDGET, checking the KV
memory after every llama_decode (every micro-batch of the prompt, then every generated token);
prints what it saw as JSON.

    python tests/scripts/budget.py N_CTX PROMPT_TOKENS N_BATCH
Environment: KVGGML_LIB=patched, OLLAMA_KV_COMPRESSION=1 and the budget.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs


def main() -> None:
    n_ctx, n_prompt, n_batch = map(int, sys.argv[1:4])
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    totals, events = [], []
    with Runner(llama_cpp, default_model_path(), n_ctx=n_ctx, n_batch=n_batch, n_threads=2) as run:
        callback = native.CompressCallback(run.ctx, events.append)

        def total() -> int:
            stats = native.get_stats(run.ctx)
            return stats["exact_bytes"] + stats["compressed_bytes"]

        prompt = run.tokenize(default_text())[:n_prompt]
        for start in range(0, len(prompt), n_batch):
            logits = run.decode(prompt[start : start + n_batch], start, want_logits=True)
            totals.append(total())
        pos = len(prompt)
        while pos < n_ctx:
            token = int(logits[-1].argmax())
            logits = run.decode(np.array([token]), pos, want_logits=True)
            pos += 1
            totals.append(total())
        report = {
            "stats": native.get_stats(run.ctx),
            "totals": totals,
            "positions": pos,
            "steps": [s["step"] for s in native.get_segments(run.ctx, 0)],
            "events": events,
            "callback_errors": [str(e) for e in callback.errors],
        }
        callback.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
