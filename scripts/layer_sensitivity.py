#!/usr/bin/env python3
"""Which layers of a model the KLD is sensitive to: each full-attention layer's K, then its V, through
one codec while every other layer stays exact. These are `kvggml eval` rows `f16@L=CODEC|f16` and
`f16|f16@L=CODEC` (README, "Layers apart"), measured in one run; the output is their JSON, a Markdown
table and a bar plot per layer.

    .venv/bin/python scripts/layer_sensitivity.py [--model M] [-n 2048] [--codec haar:bits=4.2.2.2.2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kvggml.evaluate import Row, evaluate
from kvggml.library import load_llama_cpp
from kvggml.model import default_model_path, default_text, silence_llama_logs
from kvggml.plan import KVShape
from kvggml.tune import plot_per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("-n", "--n-prefill", type=int, default=2048, help="tokens in the cache (default 2048)")
    parser.add_argument("-m", "--n-score", type=int, default=512, help="tokens scored after it (default 512)")
    parser.add_argument("--codec", default="haar:bits=4.2.2.2.2", help="the codec one layer's K or V goes through")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/results/layers"))
    args = parser.parse_args()

    model = args.model or default_model_path()
    layers = KVShape.from_gguf(model).full_attention_layers
    rows = [Row.parse(f"f16@{il}={args.codec}|f16") for il in layers]
    rows += [Row.parse(f"f16|f16@{il}={args.codec}") for il in layers]
    os.environ.setdefault("KVGGML_LIB", "stock")  # offline, as kvggml eval
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    report = evaluate(
        llama_cpp, model, default_text(), rows, n_prefill=args.n_prefill, n_score=args.n_score, n_threads=args.threads
    )
    kld = [r["kld_mean"] for r in report["rows"]]
    per_layer = [{"layer": il, "k_kld": kld[i], "v_kld": kld[len(layers) + i]} for i, il in enumerate(layers)]
    report.update(codec=args.codec, per_layer=per_layer)

    name = f"sensitivity-{model.stem}-N{args.n_prefill}"  # model stems hold dots: no with_suffix
    path = {kind: args.out / f"{name}.{kind}" for kind in ("json", "md", "png")}
    args.out.mkdir(parents=True, exist_ok=True)
    path["json"].write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"| layer | K through {args.codec} | V through it |", "|---:|---:|---:|"]
    lines += [f"| {p['layer']} | {p['k_kld']:.4f} | {p['v_kld']:.4f} |" for p in per_layer]
    path["md"].write_text("\n".join(lines) + "\n")
    plot_per_layer(
        [dict(layer=p["layer"], role=role, kld=p[f"{role}_kld"]) for p in per_layer for role in ("k", "v")],
        "kld",
        "mean KLD (log)",
        f"{model.name}, N={args.n_prefill}\none layer's K or V through {args.codec}, the rest exact",
        path["png"],
        log=True,
    )
    print("\n".join(lines))
    print(f"wrote {', '.join(map(str, path.values()))}")


if __name__ == "__main__":
    main()
