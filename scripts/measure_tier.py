#!/usr/bin/env python3
"""Measure the compressed KV tier inside llama.cpp against stock llama.cpp.

    measure_tier.py memory   [--ctx 16384]           KV bytes (library accounting) and peak RSS
    measure_tier.py quality  [--ctx 4096 --chunks 4] llama-perplexity --kl-divergence vs stock f16 logits
    measure_tier.py speed    [--depths 2048,8192]    llama-bench prefill / decode at depth
    measure_tier.py recall   [--ctx 7600]            a planted fact at several depths and seeds, asked at the end
    measure_tier.py frontier                         KV bytes against KLD, from the memory and
                                                     quality JSONs of the same --out: a table and a PNG

A variant is a name of VARIANTS, optionally followed by settings of the hierarchy, each
`;NAME=VALUE` for OLLAMA_KV_COMPRESSION_NAME: "kvggml hi;THRESHOLD=256;BUDGET=0.2".

Every run is a separate process on the stock or the patched build of the same pinned
llama.cpp; results are printed as a table and written to results/tier-<what>.json.
Run with the repo's venv: .venv/bin/python scripts/measure_tier.py memory
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvggml.library import library_dir  # noqa: E402
from kvggml.model import default_model_path, default_text  # noqa: E402
from kvggml.presets import PRESETS  # noqa: E402

# label -> (library, cache type, compression preset or None)
VARIANTS = {
    "stock f16": ("stock", "f16", None),
    "stock q8_0": ("stock", "q8_0", None),
    "stock q4_0": ("stock", "q4_0", None),
    **{f"kvggml {p}": ("patched", "f16", p) for p in PRESETS},
}
GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}

MEMORY_PROBE = r"""
import ctypes, json, re, resource, sys, time
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text
from kvggml.native import stats_or_none
n_ctx, type_id, fill = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
llama_cpp = load_llama_cpp()
log = []
@llama_cpp.llama_log_callback
def keep(level, text, user_data):
    log.append(text.decode(errors="replace"))
llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
with Runner(llama_cpp, default_model_path(), n_ctx=n_ctx, n_batch=512, type_k=type_id, type_v=type_id) as run:
    # llama.cpp's own accounting of the cache it allocated, from its log line at context creation
    allocated = [float(m.group(1)) for m in re.finditer(r"llama_kv_cache: size = +([\d.]+) MiB", "".join(log))]
    tokens = run.tokenize(default_text())[:n_ctx] if fill else []
    t0 = time.perf_counter()
    run.decode(tokens, 0)
    seconds = time.perf_counter() - t0
    stats = stats_or_none(llama_cpp, run.ctx)
print(json.dumps({"tokens": len(tokens), "prefill_s": seconds, "allocated_mib": allocated[0], "stats": stats,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def parse_variant(variant: str) -> tuple[str, str, str | None, dict[str, str]]:
    """(library, cache type, preset, extra OLLAMA_KV_COMPRESSION_* variables) of a variant."""
    name, *settings = variant.split(";")
    lib, cache, preset = VARIANTS[name]
    extra = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        extra[f"OLLAMA_KV_COMPRESSION_{key}"] = value
    return lib, cache, preset, extra


RECALL_PROBE = r"""
import json, sys
import numpy as np
from kvggml.library import load_llama_cpp
from kvggml.model import default_model_path
n_ctx, depths, seeds = int(sys.argv[1]), [float(d) for d in sys.argv[2].split(",")], int(sys.argv[3])
head, junk, tail = json.loads(sys.argv[4])
llama_cpp = load_llama_cpp()
llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=n_ctx, n_batch=512, n_threads=2, verbose=False)
n_junk = (n_ctx - 96) // len(llm.tokenize(junk.encode(), add_bos=False))  # the most repetitions that fit
results = []
for seed in range(seeds):
    key = str(np.random.default_rng(seed).integers(10000, 100000))
    fact = f" The pass key is {key}. Remember it. {key} is the pass key."
    for depth in depths:
        cut = int(depth * n_junk)
        prompt = head + junk * cut + fact + junk * (n_junk - cut) + tail
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
        results.append({"seed": seed, "depth": depth, "key": key, "answer": out, "recalled": key in out,
                        "prompt_tokens": len(llm.tokenize(prompt.encode()))})
        print(f"seed {seed} depth {depth}: {key in out} ({out.strip()!r})", file=sys.stderr, flush=True)
print(json.dumps(results))
"""


def passkey_prompt() -> tuple[str, str, str]:
    """(prefix, junk sentence, suffix) of llama.cpp's examples/passkey, read from the pinned source."""
    source = (REPO / "vendor" / "llama.cpp" / "examples" / "passkey" / "passkey.cpp").read_text()
    prefix = re.search(r'prompt_prefix = "([^"]+)"', source).group(1)
    suffix = re.search(r'prompt_suffix = "([^"]+)"', source).group(1)
    junk = re.search(r'params.prompt \+= "( The grass[^"]+)"', source).group(1)
    return prefix, junk, suffix


def measure_recall(args) -> list[dict]:
    """llama.cpp's passkey test (examples/passkey: its prompt and junk text) as a completion: the key
    at each depth for each seed, the same prompts for every variant."""
    rows = []
    for variant in args.variants:
        print(f"[recall] {variant}", file=sys.stderr, flush=True)
        cases = run_probe(
            variant, RECALL_PROBE, str(args.ctx), args.recall_depths, str(args.seeds), json.dumps(passkey_prompt())
        )
        rows.append(
            {
                "variant": variant,
                "recalled": sum(c["recalled"] for c in cases),
                "cases": len(cases),
                "prompt_tokens": max(c["prompt_tokens"] for c in cases),
                "missed (depth/seed)": " ".join(f"{c['depth']}/{c['seed']}" for c in cases if not c["recalled"]) or "-",
            }
        )
        print(f"[recall] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # kept if a later variant fails
    return rows


def run_probe(variant: str, probe: str, *args: str) -> object:
    """Run a probe program with the variant's library and variables; the JSON of its last line."""
    res = subprocess.run(
        [sys.executable, "-c", probe, *args], env=variant_env(variant), capture_output=True, text=True, cwd=REPO
    )
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def variant_env(variant: str) -> dict:
    lib, _, preset, extra = parse_variant(variant)
    env = {**os.environ, "KVGGML_LIB": lib, "OLLAMA_KV_COMPRESSION": "1" if preset else "0"}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if preset:
        env.update({"OLLAMA_KV_COMPRESSION_PRESET": preset, **extra})
    return env


def tool(variant: str, name: str) -> str:
    return str(library_dir(parse_variant(variant)[0]) / name)


def cache_flags(variant: str) -> list[str]:
    cache = parse_variant(variant)[1]
    # quantized V needs flash attention; use it everywhere so every row runs the same kernel
    return ["-ctk", cache, "-ctv", cache, "-fa", "on"]


def measure_memory(args) -> list[dict]:
    rows = []
    for variant in args.variants:
        cache = parse_variant(variant)[1]
        fill = variant not in args.no_fill
        print(
            f"[memory] {variant}: n_ctx {args.ctx}, " + (f"{args.ctx}-token prompt" if fill else "no prompt"),
            file=sys.stderr,
            flush=True,
        )
        probe = run_probe(variant, MEMORY_PROBE, str(args.ctx), str(GGML_TYPES[cache]), "1" if fill else "0")
        stats = probe["stats"]
        # kvggml: its exact cells + compressed blocks; stock: the cells it allocated for n_ctx
        kv_mib = (stats["exact_bytes"] + stats["compressed_bytes"]) / 2**20 if stats else probe["allocated_mib"]
        rows.append(
            {
                "variant": variant,
                "kv_mib": kv_mib,
                "allocated_f16_cells_mib": probe["allocated_mib"],
                "peak_rss_mib": probe["peak_rss_mib"] if fill else None,
                "prefill_s": probe["prefill_s"],
                "stats": stats,
            }
        )
    base = rows[0]["kv_mib"]
    for r in rows:
        r["kv_vs_first"] = r["kv_mib"] / base
    return rows


def run_perplexity(variant: str, args, extra: list[str]) -> str:
    cmd = [
        tool(variant, "llama-perplexity"),
        "-m",
        str(args.model),
        "-f",
        str(args.text_file),
        "-c",
        str(args.ctx),
        "-b",
        "512",
        "-ub",
        "512",
        "--chunks",
        str(args.chunks),
        "-t",
        str(args.threads),
        *cache_flags(variant),
        *extra,
    ]
    res = subprocess.run(cmd, env=variant_env(variant), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def measure_quality(args) -> list[dict]:
    base = args.out / f"kld-base-c{args.ctx}-chunks{args.chunks}.bin"
    if base.exists() and args.reuse_base:
        print(f"[quality] stock f16 base logits from {base}", file=sys.stderr, flush=True)
    else:
        print(f"[quality] stock f16 base logits -> {base}", file=sys.stderr, flush=True)
        run_perplexity("stock f16", args, ["--kl-divergence-base", str(base)])
    rows = []
    for variant in args.variants:
        print(f"[quality] {variant}", file=sys.stderr, flush=True)
        out = run_perplexity(variant, args, ["--kl-divergence-base", str(base), "--kl-divergence"])
        row = {"variant": variant}
        for key, pattern in {
            "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
            "kld_mean": r"Mean\s+KLD:\s*([-\d.]+)",
            "kld_p99": r"99\.0%\s+KLD:\s*([-\d.]+)",
            "same_top_p": r"Same top p:\s*([\d.]+)",
        }.items():
            m = re.search(pattern, out)
            row[key] = float(m.group(1)) if m else None
        rows.append(row)
    return rows


def measure_speed(args) -> list[dict]:
    rows = []
    for variant in args.variants:
        print(f"[speed] {variant}", file=sys.stderr, flush=True)
        cmd = [
            tool(variant, "llama-bench"),
            "-m",
            str(args.model),
            "-p",
            "512",
            "-n",
            "32",
            "-d",
            args.depths,
            "-r",
            "1",
            "-t",
            str(args.threads),
            "-o",
            "json",
            *cache_flags(variant),
        ]
        res = subprocess.run(cmd, env=variant_env(variant), capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        for test in json.loads(res.stdout):
            kind = "prefill" if test["n_prompt"] else "decode"
            rows.append({"variant": variant, "test": f"{kind} @ depth {test['n_depth']}", "tokens_s": test["avg_ts"]})
    base = {r["test"]: r["tokens_s"] for r in rows if r["variant"] == args.variants[0]}
    for r in rows:
        r["vs_first"] = r["tokens_s"] / base[r["test"]]
    return rows


def measure_frontier(args) -> list[dict]:
    """Each variant measured for both memory and quality: its KV bytes at the end of a full context
    against its KLD, with the f16 part reported apart, plotted one point per variant."""
    memory = {r["variant"]: r for r in json.loads((args.out / "tier-memory.json").read_text())["rows"]}
    quality = json.loads((args.out / "tier-quality.json").read_text())["rows"]
    f16 = memory["stock f16"]["kv_mib"]
    rows = []
    for q in quality:
        m = memory.get(q["variant"])
        if m is None:
            continue
        stats = m["stats"] or {}
        rows.append(
            {
                "variant": q["variant"],
                "kv_mib": m["kv_mib"],
                "vs_f16": m["kv_mib"] / f16,
                "exact_f16_mib": stats.get("exact_bytes", 0) / 2**20,
                "kld_mean": q["kld_mean"],
                "same_top_p": q["same_top_p"],
            }
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for r in rows:
        stock = r["variant"].startswith("stock")
        ax.scatter(
            100 * r["vs_f16"], r["kld_mean"], marker="s" if stock else "o", color="tab:red" if stock else "tab:blue"
        )
        ax.annotate(
            r["variant"].removeprefix("kvggml "),
            (100 * r["vs_f16"], r["kld_mean"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 3),
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"KV memory at the end of a full {args.ctx}-token context, % of stock f16")
    ax.set_ylabel("mean KLD against stock f16 (llama-perplexity, log)")
    ax.set_title(f"{Path(args.model).name}: stock cache types and kvggml settings")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "tier-frontier.png")
    plt.close(fig)
    return rows


def print_table(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k != "stats"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "quality", "speed", "recall", "frontier"])
    parser.add_argument("--ctx", type=int, help="context (memory: 16384, quality: 4096)")
    parser.add_argument("--chunks", type=int, default=4, help="llama-perplexity chunks")
    parser.add_argument("--depths", default="2048,8192", help="llama-bench depths")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="variants, the first is the baseline")
    parser.add_argument("--no-fill", nargs="*", default=[], help="memory: variants measured without the prompt")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--recall-depths", default="0.1,0.3,0.5,0.7,0.9", help="recall: where the key is")
    parser.add_argument("--seeds", type=int, default=2, help="recall: keys and fillers per depth")
    parser.add_argument("--reuse-base", action="store_true", help="quality: keep stock f16 logits from an earlier run")
    args = parser.parse_args()
    for v in args.variants:
        if v.split(";")[0] not in VARIANTS:
            parser.error(f"unknown variant {v!r}: expected one of {', '.join(VARIANTS)}, then ;NAME=VALUE settings")
    args.ctx = args.ctx or {"memory": 16384, "recall": 7600}.get(args.what, 4096)
    args.model = default_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    args.text_file = args.out / "text.txt"
    args.text_file.write_text(default_text())
    measure = {
        "memory": measure_memory,
        "quality": measure_quality,
        "speed": measure_speed,
        "recall": measure_recall,
        "frontier": measure_frontier,
    }
    rows = measure[args.what](args)
    (args.out / f"tier-{args.what}.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
