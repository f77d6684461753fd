"""`kvggml.Llama` as a Python user drives it: `.compression`, llama-cpp-python's own state
saving and prefix reuse, on the default model and the patched library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, numpy as np
from kvggml import Llama
from kvggml.model import default_model_path, default_text
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
last_logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
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
"""


def test_python_layer_drives_compression_state_and_prefix_reuse():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_KV_COMPRESSION")}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    env.update({"KVGGML_LIB": "patched", "OLLAMA_KV_COMPRESSION_THRESHOLD": "256"})
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
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
