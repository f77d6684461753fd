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
    plot(per_layer, args.codec, model.name, args.n_prefill, path["png"])
    print("\n".join(lines))
    print(f"wrote {', '.join(map(str, path.values()))}")


def plot(per_layer: list[dict], codec: str, model: str, n_prefill: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(per_layer))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(per_layer)), 4), dpi=120)
    ax.bar([i - 0.2 for i in x], [p["k_kld"] for p in per_layer], width=0.4, label="K", color="tab:blue")
    ax.bar([i + 0.2 for i in x], [p["v_kld"] for p in per_layer], width=0.4, label="V", color="tab:orange")
    ax.set_xticks(list(x), [str(p["layer"]) for p in per_layer])
    ax.set_yscale("log")
    ax.set_xlabel("model layer")
    ax.set_ylabel("mean KLD (log)")
    ax.set_title(f"{model}, N={n_prefill}\none layer's K or V through {codec}, the rest exact", fontsize=9)
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
