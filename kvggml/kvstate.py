"""Read and write the K/V tensors inside a llama.cpp sequence-state blob.

`llama_state_seq_get_data` serialises a sequence's KV cache; this module finds
each layer's K and V rows in that blob so a codec can be applied to them and
the blob written back with `llama_state_seq_set_data`. Everything that is not
K/V data (cell positions, sequence ids, headers) is kept byte for byte.

Blob layout: u32 magic 0xaf143cd8, i32 seq_id (llama-context.cpp), then
(llama-kv-cache.cpp, state_write) once per cache part (one part for most
models; iSWA models such as Gemma 3 write the full-attention cache, then the
sliding-window cache):

    u32 n_stream
    per stream: u32 cell_count; if cell_count > 0:
        per cell: i32 pos, u32 n_seq_id, i32 seq_id[n_seq_id]
        u32 v_trans, u32 n_layer
        per layer K: i32 type, u64 row_bytes, row_bytes * cell_count bytes
        per layer V: v_trans == 0: as K
                     v_trans == 1: i32 type, u32 el_bytes, u32 n_embd, n_embd * cell_count * el_bytes

A context that compresses puts its tier's section (docs/FORMAT.md, section 9) in front of the
full-attention cache's part: the compressed blocks, read here into TierSection (checksum not checked:
the library checks it on load).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

STATE_MAGIC = 0xAF143CD8
TIER_MAGIC = 0x5447564B  # "KVGT": the tier's section (docs/FORMAT.md, section 9)
TIER_VERSION = 4
TIER_VERSIONS_READ = (3, 4)  # 3 had no per-head steps
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
GGML_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16"}


class StateFormatError(ValueError):
    """The blob is not a KV-cache state this module understands."""


@dataclass
class TensorRows:
    """One layer's K or V for the cells of one stream: a (cell_count, n_embd) matrix in the blob."""

    part: int
    layer: int
    role: str  # "k" or "v"
    ggml_type: int
    offset: int  # byte offset of the data in the blob
    n_cells: int
    n_embd: int
    transposed: bool  # stored (n_embd, n_cells): V without flash attention

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")

    def _dtype(self) -> np.dtype:
        if self.ggml_type == GGML_TYPE_F16:
            return np.dtype("<f2")
        if self.ggml_type == GGML_TYPE_F32:
            return np.dtype("<f4")
        if self.ggml_type == GGML_TYPE_BF16:
            return np.dtype("<u2")
        raise StateFormatError(
            f"layer {self.layer} {self.role.upper()} is {self.type_name}: codecs apply to f16, bf16 or f32 caches only"
        )

    @property
    def nbytes(self) -> int:
        return self.n_cells * self.n_embd * self._dtype().itemsize

    def read(self, blob: bytes | bytearray) -> np.ndarray:
        """float32 (n_cells, n_embd)."""
        dtype = self._dtype()
        raw = np.frombuffer(blob, dtype=dtype, count=self.n_cells * self.n_embd, offset=self.offset)
        if self.ggml_type == GGML_TYPE_BF16:
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        shape = (self.n_embd, self.n_cells) if self.transposed else (self.n_cells, self.n_embd)
        values = raw.reshape(shape).astype(np.float32)
        return values.T.copy() if self.transposed else values

    def write(self, blob: bytearray, values: np.ndarray) -> None:
        """Store float32 (n_cells, n_embd) back, rounded to the cache's type."""
        if values.shape != (self.n_cells, self.n_embd):
            raise ValueError(f"expected shape {(self.n_cells, self.n_embd)}, got {values.shape}")
        stored = values.T if self.transposed else values
        if self.ggml_type == GGML_TYPE_BF16:
            bits = np.ascontiguousarray(stored, dtype=np.float32).view(np.uint32)
            # round to nearest even, as ggml's fp32->bf16 does
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        else:
            raw = np.ascontiguousarray(stored, dtype=self._dtype())
        blob[self.offset : self.offset + self.nbytes] = raw.tobytes()


@dataclass
class CacheStream:
    """The cells of one stream of one cache part, with their layers' K and V."""

    part: int
    positions: np.ndarray  # int32 (n_cells,)
    k: list[TensorRows] = field(default_factory=list)
    v: list[TensorRows] = field(default_factory=list)


@dataclass
class TierBlock:
    """One compressed block: B token positions (-1 for a removed token) and, per cache layer, its K and
    V block bytes (docs/FORMAT.md, sections 1-8)."""

    seq: int
    positions: np.ndarray  # int32 (B,)
    moved: np.ndarray  # int32 (B,): the RoPE rotation each key is owed
    step: int  # hierarchy steps taken (with per-head steps, the most any head took)
    head_steps: bytes  # per cache layer and KV head, the steps its channels took; empty: all at `step`
    k: list[bytes]
    v: list[bytes]


@dataclass
class TierSection:
    level: int  # L: blocks of 2^L tokens
    k_width: int
    v_width: int
    basis: int  # 1: K in llama.cpp's Hadamard basis, + 2: V
    blocks: list[TierBlock]


@dataclass
class KVState:
    blob: bytearray
    streams: list[CacheStream]  # non-empty streams, in blob order
    n_parts: int
    tier: TierSection | None = None  # the compressed blocks of a context that compresses

    @classmethod
    def parse(cls, data: bytes) -> KVState:
        reader = _Reader(data)
        magic = reader.u32("magic")
        if magic != STATE_MAGIC:
            raise StateFormatError(f"not a llama.cpp sequence state: magic {magic:#010x}, expected {STATE_MAGIC:#010x}")
        reader.unpack("<i", "seq_id")
        streams: list[CacheStream] = []
        part = 0
        tier = None
        if reader.pos + 4 <= len(data) and struct.unpack_from("<I", data, reader.pos)[0] == TIER_MAGIC:
            tier = _parse_tier(reader)
        while reader.pos < len(data):
            n_stream = reader.u32("n_stream")
            if not 1 <= n_stream <= 256:
                raise StateFormatError(f"cache part {part}: n_stream {n_stream} is not in 1..256")
            for _ in range(n_stream):
                cell_count = reader.u32("cell_count")
                if cell_count:
                    streams.append(_parse_stream(reader, part, cell_count))
            part += 1
        if part == 0:
            raise StateFormatError("empty state: the sequence has no cells")
        return cls(bytearray(data), streams, part, tier)

    def bytes(self) -> bytes:
        return bytes(self.blob)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > len(self.data):
            raise StateFormatError(
                f"truncated state: {what} needs {n} bytes at offset {start}, the blob has {len(self.data)}"
            )
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)


def _parse_stream(r: _Reader, part: int, cell_count: int) -> CacheStream:
    positions = np.empty(cell_count, dtype=np.int32)
    for i in range(cell_count):
        positions[i] = r.unpack("<i", "cell position")
        n_seq = r.u32("cell n_seq_id")
        if n_seq > 4096:
            raise StateFormatError(
                f"cell {i}: n_seq_id {n_seq} is implausible (cells with extra M-RoPE data are not supported)"
            )
        r.take(4 * n_seq, "cell seq ids")
    v_trans = r.u32("v_trans")
    n_layer = r.u32("n_layer")
    if v_trans > 1 or not 1 <= n_layer <= 1024:
        raise StateFormatError(f"cache part {part}: v_trans={v_trans}, n_layer={n_layer} are not a KV cache header")
    stream = CacheStream(part, positions)
    for il in range(n_layer):
        stream.k.append(_parse_rows(r, part, il, "k", cell_count))
    for il in range(n_layer):
        if v_trans:
            ggml_type = r.unpack("<i", "V type")
            el_bytes = r.u32("V element size")
            n_embd = r.u32("V n_embd")
            offset = r.take(n_embd * cell_count * el_bytes, f"layer {il} V data")
            stream.v.append(TensorRows(part, il, "v", ggml_type, offset, cell_count, n_embd, True))
        else:
            stream.v.append(_parse_rows(r, part, il, "v", cell_count))
    return stream


def _parse_rows(r: _Reader, part: int, il: int, role: str, cell_count: int) -> TensorRows:
    ggml_type = r.unpack("<i", f"{role.upper()} type")
    row_bytes = r.unpack("<Q", f"{role.upper()} row size")
    offset = r.take(row_bytes * cell_count, f"layer {il} {role.upper()} data")
    element = {GGML_TYPE_F16: 2, GGML_TYPE_BF16: 2, GGML_TYPE_F32: 4}.get(ggml_type)
    # Quantized rows stay opaque (n_embd unknown); reading them as floats raises a clear error.
    n_embd = row_bytes // element if element else 0
    return TensorRows(part, il, role, ggml_type, offset, cell_count, n_embd, False)


def _parse_tier(r: _Reader) -> TierSection:
    r.u32("tier magic")
    version = r.u32("tier version")
    if version not in TIER_VERSIONS_READ:
        raise StateFormatError(
            f"tier section version {version}: this reader knows versions {', '.join(map(str, TIER_VERSIONS_READ))}"
        )
    level, n_layers, k_width, v_width, basis, n_blocks = (
        r.u32(f"tier {field}") for field in ("level", "layers", "K width", "V width", "basis", "blocks")
    )
    if level > 8 or not 1 <= n_layers <= 1024:
        raise StateFormatError(f"tier section: level {level} (0..8), layers {n_layers} (1..1024)")
    n = 1 << level
    blocks = []
    for b in range(n_blocks):
        seq = r.unpack("<i", f"block {b} seq")
        positions = np.frombuffer(r.data, "<i4", n, r.take(4 * n, f"block {b} positions")).copy()
        moved = np.frombuffer(r.data, "<i4", n, r.take(4 * n, f"block {b} moved")).copy()
        step = r.u32(f"block {b} step")
        head_steps = b""
        if version >= 4:
            n_heads = r.u32(f"block {b} head steps")
            start = r.take(n_heads, f"block {b} head steps")
            head_steps = bytes(r.data[start : start + n_heads])
        k, v = [], []
        for il in range(n_layers):
            for role, rows in (("K", k), ("V", v)):
                size = r.u32(f"block {b} layer {il} {role} size")
                start = r.take(size, f"block {b} layer {il} {role} bytes")
                rows.append(bytes(r.data[start : start + size]))
        blocks.append(TierBlock(seq, positions, moved, step, head_steps, k, v))
    r.take(8, "tier checksum")
    return TierSection(level, k_width, v_width, basis, blocks)
