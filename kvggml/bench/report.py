"""The bench's outputs from its finished cells: one Markdown table per measurement, the memory-KLD
frontier, each cell's figure as it finishes, and PNG plots when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path

from kvggml.bench.variants import REFERENCE


def of(records: list[dict], measurement: str) -> list[dict]:
    """The measured cells of one measurement (not those the library refused)."""
    return [r for r in records if r["measurement"] == measurement and "refused" not in r["result"]]


def refused_table(records: list[dict]) -> str:
    rows = [
        [r["variant"], r["measurement"], params_text(r["params"]), r["result"]["refused"]]
        for r in records
        if "refused" in r["result"]
    ]
    return table(["cache", "measurement", "parameters", "the library's reason"], rows) if rows else ""


def params_text(params: dict) -> str:
    """What tells a refused cell from its neighbours: its context or depth, and speed's flash attention."""
    words = [f"{k} {v}" for k, v in params.items() if k in ("n_ctx", "depth")]
    if "flash_attn" in params:
        words.append(f"flash attention {flash_attention(params)}")
    return ", ".join(words)


def flash_attention(params: dict) -> str:
    """A speed cell's flash attention: on unless the cell says off (cells from before the setting: on)."""
    return "on" if params.get("flash_attn", 1) else "off"


def reference(records: list[dict], record: dict, *same: str) -> dict | None:
    """Stock f16's result in the record's measurement, with the same values of the parameters `same`."""
    for r in of(records, record["measurement"]):
        if r["variant"] == REFERENCE and all(r["params"][k] == record["params"][k] for k in same):
            return r["result"]
    return None


def ratio(value: float | None, base: float | None, unit: str = "×") -> str:
    if value is None or not base:
        return "–"
    return f"{100 * value / base:.1f} %" if unit == "%" else f"{value / base:.2f}×"


def fixed(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def rate(speed: dict) -> str:
    return f"{speed['mean']:.1f} ± {speed['sd']:.1f}"


def table(head: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = [head, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def memory_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(of(records, "memory"), key=lambda r: r["params"]["n_ctx"]):
        result, base = r["result"], reference(records, r, "n_ctx")
        rows.append(
            [
                r["variant"],
                str(r["params"]["n_ctx"]),
                fixed(result["kv_mib"], 1),
                ratio(result["kv_mib"], base and base["kv_mib"], "%"),
                fixed(result["exact_f16_mib"], 1),
                fixed(result["peak_rss_mib"], 1),
            ]
        )
    return table(["cache", "n_ctx", "KV MiB", "vs stock f16", "f16 part MiB", "peak RSS MiB"], rows)


def threads(record: dict) -> int:
    return record["params"]["threads"]


def fastest_stock(records: list[dict], depth: int, n_threads: int) -> dict | None:
    """The stock speed cell with the fastest decode at this depth and thread count: any cache type,
    flash attention on or off."""
    stock = [
        r
        for r in of(records, "speed")
        if (r["params"]["depth"], threads(r)) == (depth, n_threads) and r["variant"].startswith("stock")
    ]
    return max(stock, key=lambda r: r["result"]["decode"]["mean"], default=None)


def speed_table(records: list[dict]) -> str:
    """Each cell against the fastest stock configuration at its depth and thread count (named in the last column)."""
    rows = []
    order = lambda r: (-threads(r), r["params"]["depth"], -r["params"].get("flash_attn", 1))  # noqa: E731
    for r in sorted(of(records, "speed"), key=order):
        result, best = r["result"], fastest_stock(records, r["params"]["depth"], threads(r))
        rows.append(
            [
                r["variant"],
                flash_attention(r["params"]),
                str(threads(r)),
                str(r["params"]["depth"]),
                rate(result["prefill"]) if "prefill" in result else "–",
                rate(result["decode"]),
                ratio(result["decode"]["mean"], best and best["result"]["decode"]["mean"]),
                best and f"{best['variant']}, flash attention {flash_attention(best['params'])}",
            ]
        )
    header = ["cache", "flash attention", "threads", "depth", "prefill tok/s", "decode tok/s"]
    return table([*header, "decode vs fastest stock", "fastest stock"], rows)


def quality_table(records: list[dict]) -> str:
    rows = [
        [
            r["variant"],
            fixed(r["result"]["ppl"], 2),
            f"{r['result']['kld_mean']:.4g}",
            f"{r['result']['kld_p99']:.3g}",
            fixed(r["result"]["same_top_pct"], 1),
        ]
        for r in of(records, "quality")
    ]
    return table(["cache", "PPL", "mean KLD", "KLD p99", "same top token %"], rows)


def recall_table(records: list[dict]) -> str:
    rows = []
    for r in of(records, "recall"):
        base = reference(records, r, "n_ctx", "depths", "seeds")
        found = {(c["depth"], c["seed"]) for c in base["details"] if c["recalled"]} if base else set()
        missed = [(c["depth"], c["seed"]) for c in r["result"]["details"] if not c["recalled"]]
        rows.append(
            [
                r["variant"],
                f"{r['result']['recalled']} of {r['result']['cases']}",
                str(len(found.intersection(missed))) if base else "–",
                " ".join(f"{depth}/{seed}" for depth, seed in missed) or "–",
            ]
        )
    return table(["cache", "recalled", "lost where stock f16 recalled", "missed (depth/seed)"], rows)


def frontier_rows(records: list[dict], n_ctx: int) -> list[dict]:
    """Each variant with both a memory cell at n_ctx and a quality cell: its KV bytes against its KLD,
    and whether it is on the Pareto front (no other variant dominates it)."""
    memory = {r["variant"]: r for r in of(records, "memory") if r["params"]["n_ctx"] == n_ctx}
    f16 = memory.get(REFERENCE)
    rows = []
    for q in of(records, "quality"):
        m = memory.get(q["variant"])
        if m is not None:
            kv = m["result"]["kv_mib"]
            rows.append(
                {
                    "variant": q["variant"],
                    "kv_mib": kv,
                    "vs_f16": kv / f16["result"]["kv_mib"] if f16 else None,
                    "exact_f16_mib": m["result"]["exact_f16_mib"],
                    "kld_mean": q["result"]["kld_mean"],
                    "same_top_pct": q["result"]["same_top_pct"],
                }
            )
    for row in rows:
        row["pareto"] = not any(dominates(other, row) for other in rows)
    return rows


def dominates(a: dict, b: dict) -> bool:
    """a takes no more memory at no higher KLD than b, and is better in one of them."""
    no_worse = a["kv_mib"] <= b["kv_mib"] and a["kld_mean"] <= b["kld_mean"]
    return no_worse and (a["kv_mib"] < b["kv_mib"] or a["kld_mean"] < b["kld_mean"])


def frontier_table(rows: list[dict]) -> str:
    body = [
        [
            r["variant"],
            fixed(r["kv_mib"], 1),
            ratio(r["vs_f16"], 1.0, "%"),
            fixed(r["exact_f16_mib"], 1),
            f"{r['kld_mean']:.4g}",
            fixed(r["same_top_pct"], 1),
            "yes" if r["pareto"] else "",
        ]
        for r in rows
    ]
    return table(["cache", "KV MiB", "vs stock f16", "f16 part MiB", "mean KLD", "same top %", "Pareto"], body)


def budget_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """The quality cells of variants whose BUDGET is a fraction of f16, by the rest of their label:
    {"kvggml balanced;THRESHOLD=256": [(budget, mean KLD), ...] by budget}."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in of(records, "quality"):
        name, *settings = r["variant"].split(";")
        budgets = [s.removeprefix("BUDGET=") for s in settings if s.startswith("BUDGET=")]
        try:
            budget = float(budgets[0]) if budgets else None
        except ValueError:  # a budget in bytes
            budget = None
        if budget is not None:
            rest = ";".join([name, *(s for s in settings if not s.startswith("BUDGET="))])
            series.setdefault(rest, []).append((budget, r["result"]["kld_mean"]))
    return {label: sorted(points) for label, points in series.items()}


def figure(record: dict) -> str:
    """One finished cell's result, in a line."""
    result = record["result"]
    if "refused" in result:
        return f"refused: {result['refused']}"
    if record["measurement"] == "memory":
        rss = f", peak RSS {result['peak_rss_mib']:.0f} MiB" if result["peak_rss_mib"] else ""
        return f"KV {result['kv_mib']:.1f} MiB{rss}"
    if record["measurement"] == "speed":
        return f"prefill {rate(result['prefill'])} tok/s, decode {rate(result['decode'])} tok/s"
    if record["measurement"] == "quality":
        return f"PPL {result['ppl']:.2f}, KLD {result['kld_mean']:.4g}, same top {result['same_top_pct']:.1f} %"
    return f"recalled {result['recalled']} of {result['cases']}"


TABLES = {
    "memory": ("Memory: KV bytes once the context is full (stock: llama.cpp's allocation), peak RSS", memory_table),
    "speed": ("Speed: llama-bench tokens/s at depth, mean ± deviation over the repetitions", speed_table),
    "quality": (
        "Quality: KLD against stock f16's logits (llama-perplexity; with --quality-last, the last positions)",
        quality_table,
    ),
    "recall": ("Recall: llama.cpp's passkey test, the key at each depth for each seed", recall_table),
}


def markdown(command: str, records: list[dict], frontier_ctx: int | None) -> str:
    """bench.md: the command that produced it, then one table per measurement."""
    parts = [f"# kvggml bench\n\n```sh\n{command}\n```"]
    for measurement, (title, render) in TABLES.items():
        if of(records, measurement):
            parts.append(f"## {title}\n\n{render(records)}")
    rows = frontier_rows(records, frontier_ctx) if frontier_ctx else []
    if rows:
        parts.append(f"## Frontier: KV MiB at n_ctx {frontier_ctx} against KLD\n\n{frontier_table(rows)}")
    refused = refused_table(records)
    if refused:
        parts.append(f"## Refused: settings the library cannot hold at a cell's context\n\n{refused}")
    return "\n\n".join(parts) + "\n"


def pyplot():
    """matplotlib's pyplot without a display, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(plt, rows: list[dict], n_ctx: int, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    scored = [r for r in rows if r["kld_mean"] > 0]  # the reference, KLD 0, cannot sit on a log axis
    front = sorted((r for r in scored if r["pareto"]), key=lambda r: r["kv_mib"])
    ax.plot([r["kv_mib"] for r in front], [r["kld_mean"] for r in front], color="tab:gray", lw=1, label="Pareto front")
    for r in scored:
        stock = r["variant"].startswith("stock")
        ax.scatter(r["kv_mib"], r["kld_mean"], marker="s" if stock else "o", color="tab:red" if stock else "tab:blue")
        ax.annotate(r["variant"], (r["kv_mib"], r["kld_mean"]), fontsize=7, textcoords="offset points", xytext=(4, 3))
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(plt, fig, f"KV MiB once an n_ctx {n_ctx} context is full", "mean KLD against stock f16 (log)", title, path)


def plot_budget(plt, records: list[dict], title: str, path: Path) -> None:
    """KLD against the budget, a line per setting; stock cache types as horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for label, points in budget_series(records).items():
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for r in of(records, "quality"):
        if r["variant"].startswith("stock") and r["result"]["kld_mean"] > 0:
            ax.axhline(r["result"]["kld_mean"], ls="--", lw=1, color="tab:gray")
            ax.annotate(r["variant"], (0, r["result"]["kld_mean"]), xycoords=("axes fraction", "data"), fontsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(plt, fig, "OLLAMA_KV_COMPRESSION_BUDGET (fraction of f16)", "mean KLD against stock f16 (log)", title, path)


def speed_series(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The speed cells of each variant and flash attention setting."""
    series: dict[tuple[str, int], list[dict]] = {}
    for r in of(records, "speed"):
        series.setdefault((r["variant"], r["params"].get("flash_attn", 1)), []).append(r)
    return series


def plot_series(plt, records: list[dict], x, xlabel: str, title: str, path: Path) -> None:
    """Decode tokens/s of each variant and flash attention setting against x(cell), a line each."""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for (variant, fa), cells in speed_series(records).items():
        cells.sort(key=x)
        decode = [r["result"]["decode"] for r in cells]
        xs = [x(r) for r in cells]
        ax.errorbar(xs, [d["mean"] for d in decode], yerr=[d["sd"] for d in decode], marker="o", capsize=3)
        label = f"{variant}, FA {'on' if fa else 'off'}"
        ax.annotate(label, (xs[-1], decode[-1]["mean"]), fontsize=7, textcoords="offset points", xytext=(4, 3))
    save(plt, fig, xlabel, "decode tokens/s (mean ± deviation)", title, path)


def plot_decode(plt, records: list[dict], title: str, path: Path) -> None:
    """Decode against depth, at the largest thread count measured."""
    most = max(threads(r) for r in of(records, "speed"))
    cells = [r for r in of(records, "speed") if threads(r) == most]
    plot_series(plt, cells, lambda r: r["params"]["depth"], "depth (tokens already in the context)", title, path)


def depths_of_several_thread_counts(records: list[dict]) -> list[int]:
    """The depths at which speed was measured with more than one thread count."""
    counts: dict[int, set[int]] = {}
    for r in of(records, "speed"):
        counts.setdefault(r["params"]["depth"], set()).add(threads(r))
    return sorted(depth for depth, n in counts.items() if len(n) > 1)


def plot_threads(plt, records: list[dict], title: str, path: Path) -> None:
    """Decode against the thread count, at the deepest such depth."""
    depth = depths_of_several_thread_counts(records)[-1]
    cells = [r for r in of(records, "speed") if r["params"]["depth"] == depth]
    plot_series(plt, cells, threads, f"threads (decode at depth {depth})", title, path)


def save(plt, fig, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    ax = fig.axes[0]
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
