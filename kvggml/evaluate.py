"""Offline evaluator: what a codec does to a real model's output, measured exactly.

On the stock library: prefill N tokens of a text, read the KV cache out with
llama_state_seq_get_data, apply a codec to every cell but the first `sinks`
and the most recent `window` tokens, write it back with
llama_state_seq_set_data, then score the next M tokens (teacher-forced, one
forward pass) against the uncompressed run. Rows named `stock:<type>` instead
run llama.cpp's own quantized cache (every token quantized) from scratch.

A row `kvggml` runs the library's whole policy offline, from the same OLLAMA_KV_COMPRESSION_*
variables: the preset, then the hierarchy's schedule and budget (kvggml/hierarchy.py), with
each block coarsened step by step as the library does.

Per row: perplexity, Δperplexity %, mean and p99 KL divergence and top-1
agreement against the uncompressed run, the codec's bits per element over the
tokens it compressed, and the whole cache's size against f16 at N tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax
from tqdm import tqdm

from kvggml.codecs import Codec, parse_codec
from kvggml.config import CompressionConfig
from kvggml.hierarchy import block_steps, budget_bytes
from kvggml.kvstate import KVState
from kvggml.metrics import kld_per_row
from kvggml.model import Runner
from kvggml.plan import KVShape, exact_cells, pad

STOCK_TYPES = {"f16": (1, 16.0), "q8_0": (8, 8.5), "q4_0": (2, 4.5)}  # ggml type id, bits per element
# haar-16 changes values by ~2e-5 (relative): its KLD is the measurement's noise floor, since any change
# re-rolls the model's own rounding (e.g. the q8 activations of a quantized model).
# haar:levels=0,bits=3 is the same quantizer without the wavelet: Haar against plain at equal bits.
DEFAULT_ROWS = [
    "identity",
    "stock:q8_0",
    "stock:q4_0",
    "f16",
    "haar-16",
    "q8_0",
    "q4_0",
    "q4_0+hadamard",
    "kivi4",
    "kivi2",
    "pool2",
    "evict",
    "haar:levels=0,bits=3",
    "haar-hi",
    "haar",
    "haar-lo",
    "haar-noH",
]


@dataclass(frozen=True)
class Row:
    """One line of the evaluation: a codec on old tokens, the state round trip alone, or a stock cache type."""

    label: str
    codec: Codec | None = None  # applied to old tokens
    stock_type: str | None = None  # llama.cpp's own cache type, every token
    policy: CompressionConfig | None = None  # the library's preset and hierarchy, on old tokens

    @classmethod
    def parse(cls, spec: str) -> Row:
        if spec == "identity":
            return cls(spec)
        if spec == "kvggml":
            policy = CompressionConfig.from_env()
            if policy.guidance:
                # the offline row has no attention to sample: it would run age order and say otherwise
                raise ValueError(
                    "OLLAMA_KV_COMPRESSION_GUIDANCE=1 is not modelled offline: the row 'kvggml' needs 0 "
                    "(measure guidance with llama-perplexity on the patched build)"
                )
            return cls(spec, policy=policy)
        if spec.startswith("stock:"):
            name = spec.removeprefix("stock:")
            if name not in STOCK_TYPES:
                raise ValueError(f"{spec!r}: stock cache type must be one of {', '.join(STOCK_TYPES)}")
            return cls(spec, stock_type=name)
        return cls(spec, codec=parse_codec(spec))


@dataclass
class RowResult:
    label: str
    description: str
    ppl: float
    dppl_pct: float
    kld_mean: float
    kld_p99: float
    top1_agree: float
    bits_per_element: float  # over the tokens the row compressed (16 = untouched)
    compressed_tokens: int
    compressed_bytes: int  # what the row's codec or policy stored for them (stock: its whole cache)
    kv_bytes: int  # whole KV cache at N tokens: exact cells + compressed
    kv_ratio_f16: float  # kv_bytes / f16 bytes of the same cache
    seconds: float
    blocks_per_step: list[int]  # the `kvggml` row: blocks at each step of the hierarchy's ladder


class Reference:
    """Log-probabilities of the uncompressed run, and the scoring of another run against them."""

    def __init__(self, logits: np.ndarray, targets: np.ndarray):
        self.logp = log_softmax(logits.astype(np.float32), axis=-1)
        self.targets = targets  # tokens predicted by rows 0..M-2
        self.ppl = self._ppl(self.logp)

    def _ppl(self, logp: np.ndarray) -> float:
        nll = -logp[np.arange(len(self.targets)), self.targets]
        return float(math.exp(nll.mean()))

    def score(self, logits: np.ndarray) -> dict:
        logp = log_softmax(logits.astype(np.float32), axis=-1)
        kld = kld_per_row(self.logp, logp)
        ppl = self._ppl(logp)
        return dict(
            ppl=ppl,
            dppl_pct=100.0 * (ppl / self.ppl - 1.0),
            kld_mean=float(kld.mean()),
            kld_p99=float(np.quantile(kld, 0.99)),
            top1_agree=float((logp.argmax(-1) == self.logp.argmax(-1)).mean()),
        )


def old_cells(stream, sinks: int, window: int, block_tokens: int) -> np.ndarray:
    """Cells of whole blocks between the sinks and the window, in position order."""
    order = np.argsort(stream.positions, kind="stable")
    pos = stream.positions[order]
    old = order[(pos >= sinks) & (pos <= pos.max() - window)]
    return old[: len(old) // block_tokens * block_tokens]


def compress_state(
    state: KVState, codec: Codec, sinks: int, window: int, n_head_kv: int, model_layers: list[int]
) -> tuple[int, int, int, tuple[int, int] | None]:
    """Apply codec in place to the full-attention cache's old cells; model_layers: the model's number of
    each of that cache's layers (a codec may set layers apart by it).

    Returns (compressed elements, compressed bytes, compressed tokens, evicted position range or None).
    Only cache part 0 is touched: for iSWA models part 1 is the sliding-window cache, which
    holds just the window anyway.
    """
    elements = nbytes = tokens = 0
    evicted = None
    for stream in (s for s in state.streams if s.part == 0):
        old = old_cells(stream, sinks, window, codec.block_tokens)
        if len(old) == 0:
            continue
        tokens += len(old)
        if codec.evicts:
            evicted = (int(stream.positions[old].min()), int(stream.positions[old].max()) + 1)
            elements += sum(len(old) * r.n_embd for r in stream.k + stream.v)
            continue
        for rows in stream.k + stream.v:
            values = rows.read(state.blob)
            head_dim = rows.n_embd // n_head_kv
            block = values[old].reshape(len(old), n_head_kv, head_dim)
            decoded, size = codec.for_layer(model_layers[rows.layer]).roundtrip(block, rows.role)
            values[old] = decoded.reshape(len(old), rows.n_embd)
            rows.write(state.blob, values)
            elements += block.size
            nbytes += size
    return elements, nbytes, tokens, evicted


def apply_policy(
    state: KVState,
    config: CompressionConfig,
    sinks: int,
    window: int,
    n_head_kv: int,
    n_ctx: int,
    n_batch: int,
    model_layers: list[int],
) -> tuple[int, int, int, np.ndarray]:
    """The library's presets and hierarchy applied in place to the full-attention cache's old cells, as
    one sequence: (compressed elements, compressed bytes, compressed tokens, step of each block).
    The budget counts the exact cells the library allocates for this n_ctx and n_batch; model_layers:
    the model's number of each of that cache's layers (a layer may take a preset of its own)."""
    ladder = config.ladder()
    widths = [step.bits for step in ladder]
    (stream,) = [s for s in state.streams if s.part == 0]
    old = old_cells(stream, sinks, window, config.block_tokens)
    if len(old) == 0:
        return 0, 0, 0, np.zeros(0, np.int64)
    roles = stream.k + stream.v
    shape = lambda rows: (len(old), n_head_kv, rows.n_embd // n_head_kv)  # noqa: E731
    codec_of = lambda rows: config.codec(rows.role, model_layers[rows.layer])  # noqa: E731
    ladder_of = lambda rows: codec_of(rows).ladder(rows.read(state.blob)[old].reshape(shape(rows)), widths)  # noqa: E731
    sizes = sum(codec_of(r).ladder_sizes(ladder_of(r)) for r in roles)
    ends = stream.positions[old].reshape(-1, config.block_tokens).max(axis=1) + 1
    ages = stream.positions.max() + 1 - ends
    per_token = sum(2 * r.n_embd for r in roles)
    cells = exact_cells(dataclasses.replace(config, sinks=sinks, threshold=window), n_ctx, n_batch)
    budget = budget_bytes(config, per_token * pad(n_ctx, 256))
    steps = block_steps(ladder, ages, sizes, cells * per_token, budget)
    for rows in roles:
        values = rows.read(state.blob)
        values[old] = codec_of(rows).decode_ladder(ladder_of(rows), steps, shape(rows)).reshape(len(old), -1)
        rows.write(state.blob, values)
    nbytes = int(sizes[np.arange(len(steps)), steps].sum())
    return len(old) * per_token // 2, nbytes, len(old), steps


def cache_f16_bytes(state: KVState) -> int:
    return sum(2 * r.n_cells * r.n_embd for s in state.streams for r in s.k + s.v)


def evaluate(
    llama_cpp,
    model_path: Path,
    text: str,
    rows: list[Row],
    n_prefill: int = 2048,
    n_score: int = 512,
    window: int = 512,
    sinks: int = 4,
    n_threads: int | None = None,
    n_batch: int = 512,
    skip: int = 0,
) -> dict:
    """The report of `rows` on `text`; a progress bar on stderr counts the reference and each row.
    skip: the text's tokens passed over after its first (BOS), so that two evaluations read disjoint parts."""
    n_ctx = n_prefill + n_score
    full_attention_layers = KVShape.from_gguf(model_path).full_attention_layers
    for row in rows:  # before the reference is computed: a row's mistake costs nothing
        named = (
            row.codec.layers_named if row.codec else {layer for layer, _ in row.policy.layers} if row.policy else set()
        )
        stray = sorted(named - set(full_attention_layers))
        if stray:
            raise ValueError(
                f"row {row.label!r}: layer {', '.join(map(str, stray))} is not one that compression applies to: "
                f"allowed the model's full-attention layers, {', '.join(map(str, full_attention_layers))}"
            )
    with Runner(llama_cpp, model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads) as ref_run:
        tokens = ref_run.tokenize(text)
        if len(tokens) < skip + n_ctx + 1:
            after = f" after the {skip} passed over" if skip else ""
            raise ValueError(f"the text has {len(tokens)} tokens; N + M + 1 = {n_ctx + 1} are needed{after}")
        tokens = np.concatenate([tokens[:1], tokens[1 + skip :]])
        prefix, scored = tokens[:n_prefill], tokens[n_prefill:n_ctx]
        n_head_kv = llama_cpp.llama_model_n_head_kv(ref_run.model)
        progress = tqdm(total=len(rows) + 1, desc="uncompressed reference")
        t0 = time.perf_counter()
        ref_run.decode(prefix, 0)
        blob = ref_run.get_state()
        reference = Reference(ref_run.decode(scored, n_prefill, want_logits=True), scored[1:])
        base_seconds = time.perf_counter() - t0
        f16_bytes = cache_f16_bytes(KVState.parse(blob))
        progress.update()

        results = []
        for row in rows:
            progress.set_description(row.label)
            t0 = time.perf_counter()
            if row.stock_type:
                type_id, bits = STOCK_TYPES[row.stock_type]
                with Runner(
                    llama_cpp, model_path, n_ctx=n_ctx, type_k=type_id, type_v=type_id, n_threads=n_threads
                ) as run:
                    run.decode(prefix, 0)
                    logits = run.decode(scored, n_prefill, want_logits=True)
                kv_bytes = round(f16_bytes * bits / 16)
                extra = dict(
                    description=f"llama.cpp's own {row.stock_type} cache, every token",
                    bits_per_element=bits,
                    compressed_tokens=n_prefill,
                    compressed_bytes=kv_bytes,
                    kv_bytes=kv_bytes,
                    blocks_per_step=[],
                )
            else:
                state = KVState.parse(blob)
                evicted, elements, nbytes, n_tok, steps = None, 0, 0, 0, None
                if row.codec is not None:
                    elements, nbytes, n_tok, evicted = compress_state(
                        state, row.codec, sinks, window, n_head_kv, full_attention_layers
                    )
                if row.policy is not None:
                    elements, nbytes, n_tok, steps = apply_policy(
                        state, row.policy, sinks, window, n_head_kv, n_ctx, n_batch, full_attention_layers
                    )
                ref_run.set_state(state.bytes())
                if evicted:
                    ref_run.remove(*evicted)
                logits = ref_run.decode(scored, n_prefill, want_logits=True)
                kv_bytes = f16_bytes - 2 * elements + nbytes
                per_step = np.bincount(steps, minlength=len(row.policy.ladder()) + 1).tolist() if row.policy else []
                extra = dict(
                    description=row.codec.description
                    if row.codec
                    else policy_description(row.policy, per_step)
                    if row.policy
                    else "state read and written back unchanged",
                    bits_per_element=8.0 * nbytes / elements if elements else 16.0,
                    compressed_tokens=n_tok,
                    compressed_bytes=nbytes,
                    kv_bytes=kv_bytes,
                    blocks_per_step=per_step,
                )
            results.append(
                RowResult(
                    label=row.label,
                    **reference.score(logits),
                    **extra,
                    kv_ratio_f16=extra["kv_bytes"] / f16_bytes,
                    seconds=time.perf_counter() - t0,
                )
            )
            progress.update()
        progress.close()
    return dict(
        model=str(model_path),
        n_prefill=n_prefill,
        n_score=n_score,
        skip=skip,
        window=window,
        sinks=sinks,
        reference_ppl=reference.ppl,
        reference_seconds=base_seconds,
        f16_kv_bytes=f16_bytes,
        rows=[asdict(r) for r in results],
    )


def policy_description(config: CompressionConfig, per_step: list[int]) -> str:
    """The library's settings, and how many blocks ended at each ladder step."""
    settings = [f"{k.removeprefix('OLLAMA_KV_COMPRESSION_')}={v}" for k, v in config.to_env().items() if v][1:]
    return f"the library's policy ({', '.join(settings)}); blocks per ladder step {per_step}"


def format_table(report: dict) -> str:
    head = (
        "| row | PPL | ΔPPL % | KLD mean | KLD p99 | top-1 % | bits/elt (compressed) | KV vs f16 @N |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in report["rows"]:
        lines.append(
            f"| {r['label']} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} | {r['kld_mean']:.5f} | "
            f"{r['kld_p99']:.4f} | {100 * r['top1_agree']:.1f} | {r['bits_per_element']:.2f} | "
            f"{100 * r['kv_ratio_f16']:.1f} % |"
        )
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = out_dir / f"{stem}.png"
    plot(report, png_path)
    return json_path, png_path


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    floor = 1e-6  # KLD 0 (identity) cannot sit on a log axis
    for r in report["rows"]:
        stock = r["label"].startswith("stock:")
        haar = r["label"].startswith("haar")
        marker, color = ("s", "tab:red") if stock else ("o", "tab:blue") if haar else ("^", "tab:gray")
        y = max(r["kld_mean"], floor)
        ax.scatter(100 * r["kv_ratio_f16"], y, marker=marker, color=color, s=40)
        ax.annotate(r["label"], (100 * r["kv_ratio_f16"], y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"KV-cache memory vs f16 at N={report['n_prefill']} tokens (%)")
    ax.set_ylabel(f"mean KL divergence over {report['n_score']} tokens (log; 0 drawn at {floor:g})")
    ax.set_title(f"{Path(report['model']).name}: window {report['window']}, sinks {report['sinks']}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
