"""Planning before running: the KV memory a model needs at a context, read from its GGUF.

`kvggml info --model M --ctx N [--memory 2GiB]` prints, for stock llama.cpp's f16, q8_0 and
q4_0 caches and for each kvggml preset, the KV bytes a context of N tokens holds once full
(exact cells, staging cells and compressed blocks alike, as the library accounts them; the
compressed part is an upper bound, within 0.1 % of what the library then holds), and
with --memory the longest context that fits. The sizes follow llama.cpp's own rules for the
pinned source: contexts padded to 256 cells, sliding-window caches of
min(n_ctx, n_swa + n_ubatch) cells (one sequence), and kvggml's exact cells
(kvggml/csrc/llama-hooks.cpp, kvggml_cache_cells).
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvggml.config import CompressionConfig
from kvggml.presets import KEYS_VALUES_PRESETS, PRESETS

# Bytes per element of llama.cpp's cache types: f16, and blocks of 32 values with an f16 scale.
CACHE_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# Sliding-window layouts llama.cpp sets in code rather than reading from the GGUF
# (llama_hparams::set_swa_pattern(n): every n-th layer, the last of each n, has full attention).
SWA_PATTERNS = {"gemma3": 6}
# struct formats of GGUF's scalar value types, by gguf's GGUFValueType names.
SCALAR_FORMATS = {
    "UINT8": "B",
    "INT8": "b",
    "UINT16": "H",
    "INT16": "h",
    "UINT32": "I",
    "INT32": "i",
    "FLOAT32": "f",
    "BOOL": "?",
    "UINT64": "Q",
    "INT64": "q",
    "FLOAT64": "d",
}
# One sequence, and llama.cpp's default micro-batches (llama-cpp-python's n_batch 512).
N_BATCH = N_UBATCH = 512
UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


class PlanError(ValueError):
    """The GGUF or an argument cannot be planned for; the message says which and why."""


@dataclass(frozen=True)
class KVShape:
    """What sizes a model's KV cache: per layer, the K and V widths and whether it slides."""

    name: str
    architecture: str
    context_length: int
    k_widths: tuple[int, ...]  # n_head_kv * head_dim_k, per layer
    v_widths: tuple[int, ...]
    sliding: tuple[bool, ...]  # per layer: a sliding-window layer
    n_swa: int  # window of the sliding layers (0: none)

    @classmethod
    def from_gguf(cls, path: Path) -> KVShape:
        fields = gguf_metadata(path)

        def value(key: str, default: object = None) -> object:
            if key not in fields:
                if default is None:
                    raise PlanError(f"--model {path}: the GGUF has no '{key}'")
                return default
            return fields[key]

        arch = str(value("general.architecture"))
        n_layer = int(value(f"{arch}.block_count"))

        def per_layer(key: str, default: object = None) -> list[int]:
            raw = value(key, default)
            return [int(x) for x in raw] if isinstance(raw, list) else [int(raw)] * n_layer

        n_head = per_layer(f"{arch}.attention.head_count")
        n_head_kv = per_layer(f"{arch}.attention.head_count_kv", n_head)
        n_embd = int(value(f"{arch}.embedding_length"))
        head_k = int(value(f"{arch}.attention.key_length", n_embd // n_head[0]))
        head_v = int(value(f"{arch}.attention.value_length", n_embd // n_head[0]))
        n_swa = int(value(f"{arch}.attention.sliding_window", 0))
        sliding = [False] * n_layer
        if n_swa:
            pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
            if pattern is not None:
                sliding = [bool(x) for x in pattern]
            elif arch in SWA_PATTERNS:
                n = SWA_PATTERNS[arch]
                sliding = [il % n < n - 1 for il in range(n_layer)]
            else:
                raise PlanError(
                    f"--model {path}: {arch} has a sliding window of {n_swa} but no layer pattern "
                    f"that kvggml knows (known: {', '.join(SWA_PATTERNS)})"
                )
        return cls(
            name=Path(path).name,
            architecture=arch,
            context_length=int(value(f"{arch}.context_length")),
            k_widths=tuple(h * head_k for h in n_head_kv),
            v_widths=tuple(h * head_v for h in n_head_kv),
            sliding=tuple(sliding),
            n_swa=n_swa,
        )

    @property
    def full_attention_layers(self) -> list[int]:
        """The model's numbers of its full-attention layers: the ones compression applies to."""
        return [il for il, sliding in enumerate(self.sliding) if not sliding]

    def width(self, sliding: bool) -> int:
        """K + V values per cell, summed over the full-attention (or the sliding) layers."""
        return sum(k + v for k, v, s in zip(self.k_widths, self.v_widths, self.sliding, strict=True) if s == sliding)


def gguf_metadata(path: Path) -> dict[str, object]:
    """The GGUF's key-value section, but for the tokenizer's arrays (skipped). gguf's own GGUFReader
    parses every vocabulary entry, 12 s for Gemma 3's 262k tokens; this reads the same bytes, by
    gguf's value types, in well under a second."""
    from gguf import GGUF_MAGIC, GGUFValueType

    formats = {GGUFValueType[name]: fmt for name, fmt in SCALAR_FORMATS.items()}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset = 0

            def take(fmt: str):
                nonlocal offset
                (value,) = struct.unpack_from("<" + fmt, data, offset)
                offset += struct.calcsize("<" + fmt)
                return value

            def read(vtype: GGUFValueType, keep: bool):
                nonlocal offset
                if vtype == GGUFValueType.STRING:
                    size = take("Q")
                    offset += size
                    return bytes(data[offset - size : offset]).decode("utf-8", "replace") if keep else None
                if vtype == GGUFValueType.ARRAY:
                    item, count = GGUFValueType(take("I")), take("Q")
                    if not keep and item != GGUFValueType.STRING:
                        offset += count * struct.calcsize(formats[item])
                        return None
                    return [read(item, keep) for _ in range(count)]
                return take(formats[vtype])

            if take("I") != GGUF_MAGIC:
                raise ValueError("no GGUF magic")
            take("I")  # version
            take("Q")  # tensors
            fields = {}
            for _ in range(take("Q")):
                key = read(GGUFValueType.STRING, True)
                keep = not key.startswith("tokenizer.")
                value = read(GGUFValueType(take("I")), keep)
                if keep:
                    fields[key] = value
            return fields
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise PlanError(f"--model {path}: not a readable GGUF file ({err or type(err).__name__})") from None


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def parse_bytes(raw: str) -> int:
    """'2GiB', '512MiB', '1.5GB' or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", raw)
    if not match or match.group(2).lower() not in UNITS:
        raise PlanError(
            f"--memory {raw!r} is not a size: expected a number with an optional unit "
            f"({', '.join(u for u in UNITS if u)}), e.g. 2GiB"
        )
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise PlanError(f"--memory {raw!r} must be above 0")
    return size


@dataclass(frozen=True)
class Footprint:
    """KV bytes of one setting at one context, split the way the library accounts them."""

    exact_bytes: int  # f16 (or stock's type) cells of the full-attention layers
    compressed_bytes: int  # kvggml's blocks
    window_bytes: int  # the sliding-window layers' cells (stock's type; f16 with kvggml)

    @property
    def total(self) -> int:
        return self.exact_bytes + self.compressed_bytes + self.window_bytes


def window_cells(shape: KVShape, n_ctx_seq: int) -> int:
    return pad(min(n_ctx_seq, shape.n_swa + N_UBATCH), 256) if any(shape.sliding) else 0


def stock_footprint(shape: KVShape, cache_type: str, n_ctx: int) -> Footprint:
    cells = pad(n_ctx, 256)
    per = CACHE_TYPES[cache_type]
    return Footprint(
        int(cells * shape.width(False) * per), 0, int(window_cells(shape, cells) * shape.width(True) * per)
    )


@functools.lru_cache
def block_bytes(config: CompressionConfig, channels: int, role: str, layer: int) -> int:
    """Encoded size of one block of model layer `layer`'s K (role "k") or V, `channels` values per
    token, every group present. Real K and V can be a few bytes smaller: a detail group that is all
    zero (the V of a token repeated next to itself) is not stored. The rotation does not change the
    size, so none is applied."""
    import numpy as np

    codec = dataclasses.replace(config, hadamard=False).codec(role, layer)
    block = np.random.default_rng(0).standard_normal((config.block_tokens, channels)).astype(np.float32)
    return len(codec.encode_block(block, channels))


def exact_cells(config: CompressionConfig, n_ctx: int, n_batch: int = N_BATCH) -> int:
    """The f16 cells the library allocates for one sequence (kvggml_cache_cells): sinks, window,
    a block and a batch, padded to 32, at most the context (which llama.cpp pads to 256)."""
    return min(pad(config.sinks + config.threshold + config.block_tokens + n_batch, 32), pad(n_ctx, 256))


def kvggml_footprint(shape: KVShape, config: CompressionConfig, n_ctx: int, n_read: int | None = None) -> Footprint:
    """A context of n_ctx tokens with compression on, once n_read of them were read (default: all)."""
    n_ctx_seq = pad(n_ctx, 256)
    cells = exact_cells(config, n_ctx)
    n_read = n_ctx if n_read is None else n_read
    old = max(0, n_read - config.sinks - config.threshold) // config.block_tokens  # whole blocks
    per_block = sum(
        block_bytes(config, k, "k", layer) + block_bytes(config, v, "v", layer)
        for layer, (k, v, s) in enumerate(zip(shape.k_widths, shape.v_widths, shape.sliding, strict=True))
        if not s
    )
    return Footprint(
        cells * shape.width(False) * 2, old * per_block, window_cells(shape, n_ctx_seq) * shape.width(True) * 2
    )


def settings(shape: KVShape, config: CompressionConfig) -> dict[str, Callable[[int], Footprint]]:
    """Each setting's footprint as a function of n_ctx: stock's three cache types, then each kvggml
    preset, and K/V presets, with config's window, sinks and level; with layers of their own
    (OLLAMA_KV_COMPRESSION_LAYERS), config's preset with them too."""
    stock = {f"stock {t}": functools.partial(stock_footprint, shape, t) for t in CACHE_TYPES}
    kvggml = {
        f"kvggml {p}": functools.partial(kvggml_footprint, shape, dataclasses.replace(config, preset=p, layers=()))
        for p in (*PRESETS, *KEYS_VALUES_PRESETS)
    }
    if config.layers:
        layers = " ".join(f"{layer}={preset}" for layer, preset in config.layers)
        kvggml[f"kvggml {config.preset};LAYERS={layers}"] = functools.partial(kvggml_footprint, shape, config)
    return {**stock, **kvggml}


def longest_context(size_at: Callable[[int], int], memory: int, limit: int = 1 << 24) -> int:
    """The largest n_ctx in [0, limit] with size_at(n_ctx) <= memory (size_at never decreases)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size_at(mid) <= memory else (lo, mid - 1)
    return lo


def plan(path: Path, n_ctx: int, config: CompressionConfig, memory: int | None = None) -> dict:
    """What `kvggml info --model` reports: the model's KV shape, and per setting its bytes at n_ctx
    and, with memory, the longest context that fits."""
    if n_ctx < 1:
        raise PlanError(f"--ctx {n_ctx} is out of range: expected an integer of 1 or more")
    shape = KVShape.from_gguf(path)
    f16 = stock_footprint(shape, "f16", n_ctx).total
    rows = []
    for name, footprint_at in settings(shape, config).items():
        fp = footprint_at(n_ctx)
        row = {
            "setting": name,
            "kv_bytes": fp.total,
            "vs_f16": fp.total / f16,
            "exact_bytes": fp.exact_bytes,
            "compressed_bytes": fp.compressed_bytes,
            "window_bytes": fp.window_bytes,
        }
        if memory is not None:
            row["longest_context"] = longest_context(lambda n, at=footprint_at: at(n).total, memory)
        rows.append(row)
    return {
        "model": shape.name,
        "architecture": shape.architecture,
        "context_length": shape.context_length,
        "layers": len(shape.sliding),
        "full_attention_layers": shape.full_attention_layers,
        "sliding_window": shape.n_swa,
        "k_widths": sorted(set(shape.k_widths)),
        "v_widths": sorted(set(shape.v_widths)),
        "n_ctx": n_ctx,
        "memory": memory,
        "compression": {"threshold": config.threshold, "sinks": config.sinks, "level": config.level},
        "settings": rows,
    }


def format_plan(report: dict) -> str:
    """The plan as text: the model's shape, then a Markdown table of the settings."""
    mib = 1 << 20
    swa = (
        f", sliding window {report['sliding_window']} on {report['layers'] - len(report['full_attention_layers'])}"
        f" layers"
        if report["sliding_window"]
        else ""
    )
    c = report["compression"]
    lines = [
        f"{report['model']}: {report['architecture']}, {report['layers']} layers, full attention on "
        f"{len(report['full_attention_layers'])}{swa}; K/V widths {report['k_widths']}/{report['v_widths']} "
        f"values per token; trained context {report['context_length']}",
        f"KV memory at n_ctx {report['n_ctx']} (kvggml: threshold {c['threshold']}, sinks {c['sinks']}, "
        f"level {c['level']}; one sequence, n_batch 512):",
        "",
    ]
    header = "| setting | KV MiB | vs f16 | exact MiB | compressed MiB | window layers MiB |"
    if report["memory"] is not None:
        header += f" longest context in {report['memory'] / mib:.0f} MiB |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["settings"]:
        line = (
            f"| {row['setting']} | {row['kv_bytes'] / mib:.1f} | {row['vs_f16']:.3f} | "
            f"{row['exact_bytes'] / mib:.1f} | {row['compressed_bytes'] / mib:.1f} | {row['window_bytes'] / mib:.1f} |"
        )
        if "longest_context" in row:
            n = row["longest_context"]
            beyond = " (beyond the trained context)" if n > report["context_length"] else ""
            line += f" {n}{beyond} |"
        lines.append(line)
    return "\n".join(lines)
