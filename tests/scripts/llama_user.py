"""`kvggml.Llama` as a Python user drives it: the compression callback, segments and settings,
llama-cpp-python's save_state/load_state, and prefix reuse into the compressed region.
Prints a JSON report.

Environment: KVGGML_LIB=patched, OLLAMA_KV_COMPRESSION_THRESHOLD.
"""

from __future__ import annotations

import json

import numpy as np

from kvggml import Llama
from kvggml.model import default_model_path, default_text


def main() -> None:
    out = {}
    llm = Llama(str(default_model_path()), n_ctx=4096, n_threads=2, verbose=False)
    events = []
    llm.compression.on_compress(events.append)
    text = llm.tokenize(default_text().encode())
    llm.eval(text[:1200])
    out["events"] = [[e["p0"], e["p1"]] for e in events]
    out["stats"] = llm.compression.stats()
    out["segments"] = [[s["p0"], s["p1"], s["n_tokens"]] for s in llm.compression.segments()]
    out["settings"] = llm.compression.settings()

    # llama-cpp-python's save_state / load_state, with compressed blocks in the state
    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    state = llm.save_state()
    llm.eval(text[1200:1208])
    first = last_logits()
    llm.load_state(state)
    llm.eval(text[1200:1208])
    out["same_after_load_state"] = bool(np.array_equal(first, last_logits()))
    out["state_bytes"] = state.llama_state_size

    # prefix reuse: a new prompt sharing the first 500 tokens cuts into the compressed region
    llm.compression.configure(threshold=64)
    prompt = list(text[:500]) + list(text[3000:3100])
    reply = llm.create_completion(prompt, max_tokens=8, temperature=0)
    out["reply"] = reply["choices"][0]["text"]
    out["after_reuse"] = llm.compression.stats()
    out["last_segment"] = [[s["p0"], s["p1"], s["n_tokens"]] for s in llm.compression.segments()][-1]
    out["n_tokens"] = llm.n_tokens
    print(json.dumps(out))


if __name__ == "__main__":
    main()
