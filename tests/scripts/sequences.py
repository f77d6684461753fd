"""Two sequences in one compressed cache, their report texts, then seq_keep and seq_cp; the kept
sequence against a fresh context fed only its tokens. Prints a JSON report.

Environment: KVGGML_LIB=patched, OLLAMA_KV_COMPRESSION=1, OLLAMA_KV_COMPRESSION_THRESHOLD.
"""

from __future__ import annotations

import json

import numpy as np

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs


def segments(run: Runner, seq_id: int) -> list:
    return [(s["p0"], s["p1"], s["n_tokens"], s["bytes"]) for s in native.get_segments(run.ctx, seq_id)]


def main() -> None:
    ll = load_llama_cpp()
    silence_llama_logs(ll)
    out = {}
    with Runner(ll, default_model_path(), n_ctx=4096, n_seq_max=2, n_threads=2) as run:
        text = run.tokenize(default_text())
        a, b = text[:800], text[2000:2800]
        run.decode(a, 0, seq_id=0)
        run.decode(b, 0, seq_id=1)
        out["seq0"], out["seq1"] = segments(run, 0), segments(run, 1)
        out["stats"] = native.get_stats(run.ctx)
        out["metrics"] = native.format_metrics(run.ctx, 2)
        out["lines"] = [native.format_sequence(run.ctx, seq) for seq in (0, 1)]
        ll.llama_memory_seq_keep(run.memory, 0)
        out["after_keep"] = (segments(run, 0), segments(run, 1))
        ll.llama_memory_seq_cp(run.memory, 0, 1, -1, -1)
        out["after_cp"] = segments(run, 1)
        kept = run.decode(text[800:832], 800, want_logits=True, seq_id=0)
    with Runner(ll, default_model_path(), n_ctx=4096, n_threads=2) as fresh:
        fresh.decode(a, 0)
        alone = fresh.decode(text[800:832], 800, want_logits=True)
    out["same_top1"] = float((kept.argmax(-1) == alone.argmax(-1)).mean())
    out["max_logit_diff"] = float(np.abs(kept - alone).max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
