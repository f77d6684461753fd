"""The bench's measurements that run inside libllama, each in a process of its own (one process loads one
libllama: stock or patched, chosen by KVGGML_LIB). The last line printed is the JSON result.

    python -m kvggml.bench.probe tokens MODEL TEXT
    python -m kvggml.bench.probe memory MODEL TEXT N_CTX GGML_TYPE FILL THREADS
    python -m kvggml.bench.probe recall MODEL N_CTX GGML_TYPE DEPTHS SEEDS THREADS
    python -m kvggml.bench.probe tail MODEL TEXT N_CTX GGML_TYPE CHUNKS LAST THREADS BASE
"""

from __future__ import annotations

import ctypes
import json
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvggml.library import build_dir, load_llama_cpp

PROGRESS = "kvggml-progress: "  # a line on stderr that the bench shows beside its progress bar


def report(what: str) -> None:
    print(PROGRESS + what, file=sys.stderr, flush=True)


def reading(what: str, n_tokens: int) -> Callable[[int], None]:
    """Runner.decode's on_batch: how many of n_tokens are read."""
    return lambda done: report(f"{what}{done} of {n_tokens} tokens read")


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
        run.decode(tokens, 0, on_batch=reading("", len(tokens)))
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
    n_cases = int(seeds) * len(depths.split(","))
    for seed in range(int(seeds)):
        key = str(np.random.default_rng(seed).integers(10000, 100000))
        fact = f" The pass key is {key}. Remember it. {key} is the pass key."
        for depth in map(float, depths.split(",")):
            report(f"case {len(cases) + 1} of {n_cases}: seed {seed}, the key at depth {depth}")
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


def tail(model: str, text: str, n_ctx: str, ggml_type: str, chunks: str, last: str, threads: str, base: str) -> dict:
    """The logits of the last `last` positions of each of `chunks` contexts of n_ctx tokens of the text
    (read in 512-token micro-batches), written to `base` if it does not exist (the reference), else scored
    against it: mean and 99th percentile KLD, perplexity, same top token. llama-perplexity keeps every
    logit of a chunk's second half, n_ctx/2 x vocabulary floats: more memory than a long context of a
    large-vocabulary model allows (Gemma 3 at 32k: 17 GB, and 9 GB more for its base)."""
    import numpy as np
    from scipy.special import log_softmax

    from kvggml.metrics import kld_per_row
    from kvggml.model import Runner
    from kvggml.native import stats_or_none

    llama_cpp = load_llama_cpp()
    n_ctx, n_chunks, n_last, type_id = int(n_ctx), int(chunks), int(last), int(ggml_type)
    with Runner(llama_cpp, Path(model), n_ctx=n_ctx, type_k=type_id, type_v=type_id, n_threads=int(threads)) as run:
        tokens = run.tokenize(Path(text).read_text(encoding="utf-8"))
        logits, targets = [], []
        for c in range(n_chunks):
            chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
            llama_cpp.llama_memory_clear(run.memory, True)
            run.decode(chunk[:-n_last], 0, on_batch=reading(f"context {c + 1} of {n_chunks}: ", n_ctx))
            logits.append(run.decode(chunk[-n_last:], n_ctx - n_last, want_logits=True))
            targets.append(chunk[n_ctx - n_last + 1 :])  # the next token of each position but the last
        stats = stats_or_none(llama_cpp, run.ctx)
    logits = np.stack(logits)  # (chunks, last, vocabulary)
    if not Path(base).is_file():
        with open(base, "wb") as f:  # np.save would add .npy to the name
            np.save(f, logits)
        reference = logits
    else:
        reference = np.load(base, mmap_mode="r")
        if reference.shape != logits.shape:
            raise ValueError(f"{base}: logits of shape {reference.shape}, this run has {logits.shape}")
    kld, nll, same = [], [], []
    for c in range(n_chunks):
        for i in range(0, n_last, 64):  # 64 rows at a time: float64 log-probabilities of a large vocabulary
            ref = log_softmax(np.asarray(reference[c, i : i + 64], dtype=np.float64), axis=-1)
            own = log_softmax(logits[c, i : i + 64].astype(np.float64), axis=-1)
            kld.append(kld_per_row(ref, own))
            same.append(ref.argmax(-1) == own.argmax(-1))
            rows = np.arange(min(64, n_last - 1 - i))
            nll.append(-own[rows, targets[c][i + rows]])
    kld = np.concatenate(kld)
    return {
        "ppl": float(np.exp(np.concatenate(nll).mean())),
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "same_top_pct": float(100 * np.concatenate(same).mean()),
        "stats": stats,
    }


PROBES = {"tokens": count_tokens, "memory": memory, "recall": recall, "tail": tail}

if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]](*sys.argv[2:])))
