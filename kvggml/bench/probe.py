"""The bench's measurements that run inside libllama, each in a process of its own (one process loads one
libllama: stock or patched, chosen by KVGGML_LIB). The last line printed is the JSON result.

    python -m kvggml.bench.probe tokens MODEL TEXT
    python -m kvggml.bench.probe memory MODEL TEXT N_CTX GGML_TYPE FILL THREADS
    python -m kvggml.bench.probe recall MODEL N_CTX GGML_TYPE DEPTHS SEEDS THREADS
"""

from __future__ import annotations

import ctypes
import json
import re
import resource
import sys
import time
from pathlib import Path

from kvggml.library import build_dir, load_llama_cpp


def count_tokens(model: str, text: str) -> dict:
    llm = load_llama_cpp().Llama(model_path=model, vocab_only=True, verbose=False)
    return {"tokens": len(llm.tokenize(Path(text).read_bytes()))}


def memory(model: str, text: str, n_ctx: str, ggml_type: str, fill: str, threads: str) -> dict:
    """KV bytes once the first n_ctx tokens of the text are read in 512-token micro-batches (none when
    fill is 0): the library's accounting (exact cells + blocks) on the patched build, and on stock what
    llama.cpp allocated for n_ctx, from its log line at context creation."""
    from kvggml.model import Runner
    from kvggml.native import stats_or_none

    llama_cpp = load_llama_cpp()
    log = []

    @llama_cpp.llama_log_callback
    def keep(level, message, user_data):
        log.append(message.decode(errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    n_ctx, type_id = int(n_ctx), int(ggml_type)
    with Runner(llama_cpp, Path(model), n_ctx=n_ctx, type_k=type_id, type_v=type_id, n_threads=int(threads)) as run:
        allocated = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", "".join(log))
        tokens = run.tokenize(Path(text).read_text(encoding="utf-8"))[:n_ctx] if fill == "1" else []
        start = time.perf_counter()
        run.decode(tokens, 0)
        seconds = time.perf_counter() - start
        stats = stats_or_none(llama_cpp, run.ctx)
    return {
        "tokens": len(tokens),
        "prefill_s": seconds,
        "allocated_mib": float(allocated[0]),
        "stats": stats,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def passkey_prompt() -> tuple[str, str, str]:
    """(prefix, junk sentence, suffix) of llama.cpp's examples/passkey, read from the pinned source."""
    source = (build_dir() / "llama.cpp-stock" / "examples" / "passkey" / "passkey.cpp").read_text()
    prefix = re.search(r'prompt_prefix = "([^"]+)"', source).group(1)
    suffix = re.search(r'prompt_suffix = "([^"]+)"', source).group(1)
    junk = re.search(r'params.prompt \+= "( The grass[^"]+)"', source).group(1)
    return prefix, junk, suffix


def recall(model: str, n_ctx: str, ggml_type: str, depths: str, seeds: str, threads: str) -> list[dict]:
    """llama.cpp's passkey test as a completion: a five-digit key planted at each depth (a fraction of
    the junk text) for each seed, asked for at the end; the same prompts for every variant."""
    import numpy as np

    head, junk, tail = passkey_prompt()
    type_id = int(ggml_type)
    llm = load_llama_cpp().Llama(
        model_path=model,
        n_ctx=int(n_ctx),
        n_threads=int(threads),
        flash_attn=True,
        type_k=type_id,
        type_v=type_id,
        verbose=False,
    )
    n_junk = (int(n_ctx) - 96) // len(llm.tokenize(junk.encode(), add_bos=False))  # the most that fit
    cases = []
    for seed in range(int(seeds)):
        key = str(np.random.default_rng(seed).integers(10000, 100000))
        fact = f" The pass key is {key}. Remember it. {key} is the pass key."
        for depth in map(float, depths.split(",")):
            cut = int(depth * n_junk)
            prompt = head + junk * cut + fact + junk * (n_junk - cut) + tail
            llm.reset()
            answer = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
            cases.append(
                {
                    "seed": seed,
                    "depth": depth,
                    "key": key,
                    "answer": answer,
                    "recalled": key in answer,
                    "prompt_tokens": len(llm.tokenize(prompt.encode())),
                }
            )
    return cases


PROBES = {"tokens": count_tokens, "memory": memory, "recall": recall}

if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]](*sys.argv[2:])))
