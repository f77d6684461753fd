"""`kvggml bench`: the same model and text on stock llama.cpp and on kvggml, every cell saved as it finishes.

The inputs are checked before anything is measured. Cells already in the results file with the same
key (measurement, variant, parameters, model, text, libraries) are reused; the others run one after
another under a progress bar, and each is written to the file as soon as it finishes, so an
interrupted run keeps what finished and the next run goes on from there.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvggml.bench.measure import MEASURE, SPEED_ORDER, Inputs, run_probe
from kvggml.bench.report import (
    budget_series,
    depths_of_several_thread_counts,
    figure,
    frontier_rows,
    markdown,
    plot_budget,
    plot_decode,
    plot_frontier,
    plot_threads,
    pyplot,
)
from kvggml.bench.store import Cell, ResultStore, describe
from kvggml.bench.variants import REFERENCE, Variant
from kvggml.library import library_dir

# The full bench, and --quick: a few minutes on 2 cores with SmolLM2-135M. Quality and recall contexts
# in --quick are above the default 512-token window, so that kvggml compresses something.
FULL = dict(
    memory_ctx=[4096, 16384],
    depths=[2048, 8192],
    flash_attn=[1, 0],
    reps=3,
    quality_ctx=8192,  # where a budget of a quarter of f16 holds (at 4096 the exact window alone is 0.26)
    chunks=2,
    quality_last=0,  # 0: llama-perplexity; N: the probe's logits of each context's last N positions
    recall_ctx=7600,
    recall_depths=[0.1, 0.3, 0.5, 0.7, 0.9],
    seeds=2,
)
QUICK = dict(
    memory_ctx=[1024, 2048],
    depths=[512],
    flash_attn=[1],
    reps=2,
    quality_ctx=1024,
    chunks=2,
    quality_last=0,
    recall_ctx=2048,
    recall_depths=[0.25, 0.75],
    seeds=1,
)
# Stock allocates its whole cache for n_ctx, so its KV bytes do not depend on what was read, and
# filling a quantized stock cache is slow on CPU (stock q8_0 read 16k tokens in over 15 minutes on
# one core): the full bench measures those empty, without a peak RSS.
FULL_NO_FILL = frozenset({"stock q8_0", "stock q4_0"})
N_PROMPT, N_GEN = 512, 64  # llama-bench's prefill and decode tests at each depth
# llama-bench's micro-batches, as llama-perplexity and llama-cpp-python read: with its default of 2048
# kvggml stages 2048 exact cells, and a budget of a quarter of f16 is refused at depth 8192
N_BATCH = 512
RESULTS, TABLE = "bench.json", "bench.md"


@dataclass
class Settings:
    model: Path
    text: Path | None  # None: the default text, written to out/text.txt for llama-perplexity
    out: Path
    command: str  # as typed: bench.md names it
    variants: list[str]
    measurements: list[str]
    memory_ctx: list[int]
    depths: list[int]
    flash_attn: list[int]  # llama-bench -fa: 1 on, 0 off (stock's fastest decode depends on the CPU)
    reps: int
    quality_ctx: int
    chunks: int
    quality_last: int
    recall_ctx: int
    recall_depths: list[float]
    seeds: int
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    no_fill: frozenset[str] = frozenset()  # memory: variants measured with an empty context
    fresh: bool = False


def check_model(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"--model {path}: not a GGUF file (it starts with {magic!r}; a GGUF starts with b'GGUF')")
    return path.resolve()


def check_text(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--text {path}: not UTF-8 text ({err})") from None
    return path.resolve()


def text_file(settings: Settings) -> Path:
    if settings.text is not None:
        return check_text(settings.text)
    from kvggml.model import default_text

    path = settings.out / "text.txt"
    text = default_text()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path.resolve()


def check_text_length(settings: Settings, inputs: Inputs) -> None:
    """Enough tokens to fill the largest memory context, and for every llama-perplexity chunk (it needs
    at least two contexts' worth)."""
    needs = []
    if "memory" in settings.measurements and set(settings.variants) - settings.no_fill:
        needs.append((max(settings.memory_ctx), f"memory at n_ctx {max(settings.memory_ctx)}"))
    if "quality" in settings.measurements:  # llama-perplexity needs at least two contexts' worth
        tokens = settings.quality_ctx * (settings.chunks if settings.quality_last else max(settings.chunks, 2))
        needs.append((tokens, f"quality at n_ctx {settings.quality_ctx} with {settings.chunks} chunks"))
    if not needs:
        return
    have = run_probe(Variant.parse(REFERENCE), "tokens", inputs.model, inputs.text)["tokens"]
    need, what = max(needs)
    if have < need:
        name = settings.text or f"the default text ({inputs.text})"
        raise ValueError(f"--text {name}: {have} tokens, too short: {what} needs {need}")


@functools.cache
def library_identity(library: str) -> str:
    path = library_dir(library) / "libllama.so"
    if not path.is_file():
        raise FileNotFoundError(f"{library} libllama not found at {path}: run `make build`")
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def plan(settings: Settings) -> list[Cell]:
    """Every cell of the run, measurement by measurement, stock f16 first in each (the reference)."""
    variants = settings.variants
    params = {
        "memory": [{"n_ctx": n} for n in settings.memory_ctx],
        "speed": [
            {
                "depth": d,
                "flash_attn": fa,
                "reps": settings.reps,
                "n_prompt": N_PROMPT,
                "n_gen": N_GEN,
                "n_batch": N_BATCH,
                "threads": settings.threads,
            }
            for d in settings.depths
            for fa in settings.flash_attn
        ],
        "quality": [
            {"n_ctx": settings.quality_ctx, "chunks": settings.chunks}
            | ({"last": settings.quality_last} if settings.quality_last else {})
        ],
        "recall": [{"n_ctx": settings.recall_ctx, "depths": settings.recall_depths, "seeds": settings.seeds}],
    }
    cells = []
    for measurement in settings.measurements:
        for p in params[measurement]:
            for v in variants:
                if measurement == "speed" and not p["flash_attn"] and Variant.parse(v).cache_type != "f16":
                    continue  # llama.cpp quantizes V only under flash attention
                fill = {"fill": v not in settings.no_fill} if measurement == "memory" else {}
                cells.append(Cell(measurement, v, {**p, **fill}))
    return cells


def groups(todo: list[tuple[Cell, dict]]) -> list[list[tuple[Cell, dict]]]:
    """The cells measured together: those of one measurement and one set of parameters (MEASURE)."""
    grouped: list[list[tuple[Cell, dict]]] = []
    for cell, key in todo:
        last = grouped[-1][0][0] if grouped else None
        if last and (last.measurement, last.params) == (cell.measurement, cell.params):
            grouped[-1].append((cell, key))
        else:
            grouped.append([(cell, key)])
    return grouped


def cell_inputs(cell: Cell, variant: Variant, model: Path, text_sha256: str) -> dict:
    """What a cell's result depends on besides its parameters. KLD also depends on stock f16's logits."""
    libraries = {variant.library} | ({"stock"} if cell.measurement == "quality" else set())
    return {
        "model": {"path": str(model), "bytes": model.stat().st_size},
        "text_sha256": text_sha256,
        "libraries": {lib: library_identity(lib) for lib in sorted(libraries)},
    } | ({"order": SPEED_ORDER} if cell.measurement == "speed" else {})


def write_outputs(settings: Settings, records: list[dict]) -> list[Path]:
    """bench.md, and the plots when matplotlib is there: the paths written."""
    frontier_ctx = max(settings.memory_ctx) if {"memory", "quality"} <= set(settings.measurements) else None
    settings.out.mkdir(parents=True, exist_ok=True)
    written = [settings.out / TABLE]
    written[0].write_text(markdown(settings.command, records, frontier_ctx))
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return written
    title = f"{settings.model.name}: stock cache types and kvggml settings"
    rows = frontier_rows(records, frontier_ctx) if frontier_ctx else []
    if any(r["kld_mean"] > 0 for r in rows):
        written.append(settings.out / "bench-frontier.png")
        plot_frontier(plt, rows, frontier_ctx, title, written[-1])
    if any(len(points) > 1 for points in budget_series(records).values()):
        written.append(settings.out / "bench-budget.png")
        plot_budget(plt, records, title, written[-1])
    if any(r["measurement"] == "speed" for r in records):
        written.append(settings.out / "bench-decode.png")
        plot_decode(plt, records, title, written[-1])
    if depths_of_several_thread_counts(records):
        written.append(settings.out / "bench-threads.png")
        plot_threads(plt, records, title, written[-1])
    return written


def run(settings: Settings) -> int:
    from tqdm import tqdm

    # Every input is checked before the first measurement.
    if REFERENCE not in settings.variants:
        settings.variants = [REFERENCE, *settings.variants]
    variants = {label: Variant.parse(label) for label in settings.variants}
    if settings.quality_last >= settings.quality_ctx:
        raise ValueError(f"--quality-last {settings.quality_last}: must be below --quality-ctx {settings.quality_ctx}")
    model = check_model(settings.model)
    inputs = Inputs(model, text_file(settings), settings.threads)
    check_text_length(settings, inputs)
    text_sha256 = hashlib.sha256(inputs.text.read_bytes()).hexdigest()

    store = ResultStore(settings.out / RESULTS, settings.command, fresh=settings.fresh)
    cells = plan(settings)
    keys = [cell.key(cell_inputs(cell, variants[cell.variant], model, text_sha256)) for cell in cells]
    todo = [(cell, key) for cell, key in zip(cells, keys, strict=True) if store.find(key) is None]
    reused = len(cells) - len(todo)
    print(
        f"kvggml bench: {len(cells)} cells, {reused} reused from {store.path}"
        + (" (--fresh: none reused)" if settings.fresh else "")
        + f", {len(todo)} to measure",
        file=sys.stderr,
        flush=True,
    )
    bar = tqdm(total=len(cells), initial=reused, unit="cell", dynamic_ncols=True)
    pending: dict[str, tuple[Cell, dict]] = {}  # the group being measured, by variant

    def done(variant: str, result: dict) -> None:
        cell, key = pending.pop(variant)
        bar.update()
        tqdm.write(f"{cell.label}: {figure(store.put(key, result))}", file=sys.stderr)

    interrupted = False
    try:
        for group in groups(todo):
            pending.update({c.variant: (c, key) for c, key in group})
            first = group[0][0]
            label = f"{first.measurement} | {', '.join(map(describe, first.params.items()))}"
            MEASURE[first.measurement](
                [variants[c.variant] for c, _ in group],
                first.params,
                inputs,
                settings.out,
                lambda what, label=label: bar.set_description(f"{label} | {what}"),
                done,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:  # a failed cell, too, leaves the tables of those that finished
        bar.close()
        records = [r for r in map(store.find, keys) if r]
        written = write_outputs(settings, records)
    if interrupted:
        kept = f"{len(records)} of {len(cells)} cells kept in {store.path}"
        print(f"interrupted: {kept}; rerun the same command to go on", file=sys.stderr)
        return 130
    print(written[0].read_text())
    print(f"wrote {', '.join(map(str, [store.path, *written]))}", file=sys.stderr)
    return 0
