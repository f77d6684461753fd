#!/usr/bin/env python3
"""How far each attention path is from exact attention over the same compressed cache: the worst
relative error, over full-attention layers and queries, of one micro-batch's attention output
against float64 attention over the blocks (decoded by the numpy codec) and the exact cells, for
the shapes tests/test_direct_attention.py checks, on the direct path and on the reference path
(llama.cpp's own kernels on blocks decoded to f16). A Markdown table to stdout, JSON to --out.

    .venv/bin/python scripts/measure_attention_error.py --out docs/results/attention-error
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_direct_attention import DIRECT, REFERENCE, SHAPES, attention_errors  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "attention-error")
    args = parser.parse_args()
    rows = []
    print("| model | tokens before | micro-batch | flash attention | steps of the blocks | direct | reference |")
    print("|---|---:|---:|---|---|---:|---:|")
    for model, tokens, batch, flash_attn in SHAPES:
        row = {"model": model, "tokens": tokens, "batch": batch, "flash_attn": flash_attn}
        for name, path in (("direct", DIRECT), ("reference", REFERENCE)):
            with tempfile.TemporaryDirectory() as tmp:
                row[name] = attention_errors(Path(tmp), model, tokens, batch, flash_attn, path)
        rows.append(row)
        worst = {name: max(row[name]["errors"].values()) for name in ("direct", "reference")}
        steps = ", ".join(map(str, row["direct"]["steps"]))
        fa = "on" if flash_attn else "off"
        print(f"| {model} | {tokens} | {batch} | {fa} | {steps} | {worst['direct']:.1e} | {worst['reference']:.1e} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention-error.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
