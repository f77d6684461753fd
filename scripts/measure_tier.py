#!/usr/bin/env python3
"""Measure the compressed KV tier inside llama.cpp against stock llama.cpp, one measurement at a time:
`kvggml bench` (kvggml/bench/) with the sizes and variants the README's tables were measured with.

    measure_tier.py memory   [--ctx 16384]           KV bytes (library accounting) and peak RSS
    measure_tier.py quality  [--ctx 4096 --chunks 4] llama-perplexity --kl-divergence vs stock f16 logits
    measure_tier.py speed    [--depths 2048,8192]    llama-bench prefill / decode at depth, flash attention on and off
    measure_tier.py recall   [--ctx 7600]            a planted fact at several depths and seeds, asked at the end
    measure_tier.py frontier [--ctx 8192]            KV bytes against KLD, from the memory and quality cells
                                                     of the same --out: a table and tier-frontier.png
    measure_tier.py speed --import FILE              the speed cells of llama-bench's JSON lines measured on
                                                     a machine without this venv (scripts/speed_on_another_cpu.sh)

A variant is a name of kvggml.bench.variants.VARIANTS, optionally followed by settings of the
hierarchy, each `;NAME=VALUE` for OLLAMA_KV_COMPRESSION_NAME: "kvggml hi;THRESHOLD=256;BUDGET=0.2".
Stock f16, the reference, is always measured. Cells go to <out>/bench.json as they finish (a rerun
reuses those whose inputs match), their tables to <out>/bench.md and to stdout.
Run with the repo's venv: .venv/bin/python scripts/measure_tier.py memory
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvggml.bench.measure import speed_records  # noqa: E402
from kvggml.bench.report import frontier_rows, frontier_table, plot_frontier, pyplot, speed_table  # noqa: E402
from kvggml.bench.run import FULL, RESULTS, Settings, run, write_outputs  # noqa: E402
from kvggml.bench.store import ResultStore  # noqa: E402
from kvggml.bench.variants import VARIANTS  # noqa: E402
from kvggml.model import default_model_path  # noqa: E402

DEFAULT_CTX = {"memory": 16384, "recall": 7600, "quality": 4096, "frontier": 8192}


def frontier(args) -> int:
    """Each variant with a memory cell and a quality cell at --ctx in --out: KV MiB against KLD."""
    records = ResultStore(args.out / RESULTS, command="").records
    records = [r for r in records if r["measurement"] in ("memory", "quality") and r["params"]["n_ctx"] == args.ctx]
    rows = frontier_rows(records, args.ctx)
    if not rows:
        raise SystemExit(f"{args.out / RESULTS}: no variant has both memory and quality cells at n_ctx {args.ctx}")
    print(frontier_table(rows))
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    else:
        title = f"{default_model_path().name}: stock cache types and kvggml settings"
        plot_frontier(plt, rows, args.ctx, title, args.out / "tier-frontier.png")
    return 0


def import_speed(settings: Settings, lines: Path) -> int:
    """bench.json, bench.md and the plots of llama-bench's JSON lines, each labelled with its variant."""
    try:
        tests = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
        records = speed_records(tests)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(
            f"measure_tier.py speed --import {lines}: not llama-bench JSON lines with a label: {err!r}"
        ) from None
    failed = sorted({t["label"] for t in tests if t.get("rc", 0)})
    if failed:
        raise SystemExit(f"measure_tier.py speed --import {lines}: llama-bench failed for {', '.join(failed)}")
    store = ResultStore(settings.out / RESULTS, command=settings.command)
    for record in records:
        store.put({k: record[k] for k in ("measurement", "variant", "params", "inputs")}, record["result"])
    settings.model = Path(records[0]["inputs"]["model"]["path"])
    print(speed_table(store.records))
    for path in write_outputs(settings, store.records):
        print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "quality", "speed", "recall", "frontier"])
    parser.add_argument("--ctx", type=int, help="context (memory: 16384, quality: 4096, recall: 7600, frontier: 8192)")
    parser.add_argument("--chunks", type=int, default=4, help="llama-perplexity chunks")
    parser.add_argument("--depths", default="2048,8192", help="llama-bench depths")
    parser.add_argument("--reps", type=int, default=1, help="llama-bench repetitions")
    parser.add_argument("--flash-attn", default="1,0", help="llama-bench -fa values: 1 on, 0 off")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="variants (stock f16 is always added)")
    parser.add_argument("--no-fill", nargs="*", default=[], help="memory: variants measured without the prompt")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--recall-depths", default="0.1,0.3,0.5,0.7,0.9", help="recall: where the key is")
    parser.add_argument("--seeds", type=int, default=2, help="recall: keys and fillers per depth")
    parser.add_argument("--fresh", action="store_true", help="measure again the cells already in --out")
    parser.add_argument("--import", dest="imported", type=Path, help="speed: llama-bench JSON lines to import")
    args = parser.parse_args()
    args.ctx = args.ctx or DEFAULT_CTX.get(args.what)
    if args.what == "frontier":
        return frontier(args)
    sizes = dict(
        FULL,
        depths=[int(d) for d in args.depths.split(",")],
        flash_attn=[int(v) for v in args.flash_attn.split(",")],
        reps=args.reps,
        chunks=args.chunks,
        recall_depths=[float(d) for d in args.recall_depths.split(",")],
        seeds=args.seeds,
    )
    if args.what == "memory":
        sizes["memory_ctx"] = [args.ctx]
    elif args.what in ("quality", "recall"):
        sizes[f"{args.what}_ctx"] = args.ctx
    settings = Settings(
        **sizes,
        model=default_model_path(),
        text=None,
        out=args.out,
        command=shlex.join([".venv/bin/python", "scripts/measure_tier.py", *sys.argv[1:]]),
        variants=args.variants,
        measurements=[args.what],
        threads=args.threads,
        no_fill=frozenset(args.no_fill),
        fresh=args.fresh,
    )
    if args.imported:
        if args.what != "speed":
            raise SystemExit("measure_tier.py: --import is for speed cells only")
        return import_speed(settings, args.imported)
    try:
        return run(settings)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"measure_tier.py {args.what}: error: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
