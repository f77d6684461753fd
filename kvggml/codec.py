"""KV-cache codecs: the wavelet block codec and the baselines it is measured against (numpy reference).

Every codec takes one layer's K or V as float32 (n_tokens, n_heads, head_dim), with values exactly
representable in f16, and returns the decoded array of the same shape plus the exact size in bytes
the compressed form takes. `HaarCodec` is specified byte for byte in docs/FORMAT.md; the C
implementation must match `HaarCodec.encode_block` and `decode_block` bit for bit.

Names: `CODECS` maps registry names to configurations; `parse_codec` also accepts parametrised specs
such as ``haar:levels=4,bits=8.6.5.4.3,hadamard=1,group=64,threshold=0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import numpy as np

from kvggml.wavelet import haar_forward, haar_inverse, subband_slices

F16_MAX = np.float32(65504.0)
F16_MAX_BITS = 0x7BFF


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def hadamard_rotate(x: np.ndarray, n: int) -> np.ndarray:
    """Normalised Walsh–Hadamard transform of every run of n consecutive values along the last axis.

    float32 throughout: log2(n) butterfly stages (pairs j, j+h for h = 1, 2, ..., n/2, writing
    a+b to j and a-b to j+h), then one multiply by (float)(1/sqrt(n)). The matrix is symmetric and
    orthonormal, so the same function is its own inverse (up to float32 rounding).
    """
    if n < 1 or n & (n - 1) or x.shape[-1] % n:
        raise ValueError(f"Hadamard length {n} must be a power of two dividing the last axis ({x.shape[-1]})")
    y = np.asarray(x, dtype=np.float32).reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.reshape(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = np.stack((a + b, a - b), axis=2).reshape(-1, n)
        h *= 2
    return (y * np.float32(1 / math.sqrt(n))).reshape(x.shape)


def _check_layer(x: np.ndarray, block_tokens: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3:
        raise ValueError("expected a float32 array of shape (n_tokens, n_heads, head_dim), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if x.shape[0] % block_tokens:
        raise ValueError(f"n_tokens={x.shape[0]} is not a multiple of the codec's block of {block_tokens} tokens")
    if not np.isfinite(x).all():
        raise ValueError("input holds non-finite values")


def _check_role(role: str) -> None:
    if role not in ("k", "v"):
        raise ValueError(f"role must be 'k' or 'v', got {role!r}")


class Codec:
    """What the evaluator uses: a named configuration with a round trip through the compressed form."""

    name: str  # short registry name, or the canonical spec
    evicts: bool = False  # True only for Eviction: the evaluator removes the tokens instead
    KIND: ClassVar[str]
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {}

    @property
    def block_tokens(self) -> int:
        """n_tokens passed to roundtrip is always a multiple of this."""
        return 1

    @property
    def description(self) -> str:
        raise NotImplementedError

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        """x: float32 (n_tokens, n_heads, head_dim), one layer's K (role 'k') or V (role 'v').

        Returns the decoded float32 array of the same shape and the exact serialized size in bytes.
        """
        raise NotImplementedError

    def spec(self) -> str:
        """Canonical spec string; parse_codec(spec) gives an equal codec."""
        params = ",".join(f"{key}={_format_param(getattr(self, key))}" for key in self.SPEC_FIELDS)
        return f"{self.KIND}:{params}" if params else self.KIND

    def bits_per_element(self, n_heads: int = 4, head_dim: int = 64) -> float:
        """Compressed bits per value, measured on a seeded random-normal layer of that shape."""
        n_tokens = self.block_tokens * max(1, 64 // self.block_tokens)
        x = np.random.default_rng(0).standard_normal((n_tokens, n_heads, head_dim)).astype(np.float16)
        _, size = self.roundtrip(x.astype(np.float32), "k")
        return 8 * size / x.size

    def _set_default_name(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.spec())


def _format_param(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return ".".join(map(str, value))
    return repr(value)


def _parse_flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return raw == "1"


def _parse_dotted(raw: str) -> tuple[int, ...]:
    return tuple(int(part, 10) for part in raw.split("."))


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _require(ok: bool, kind: str, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{kind}: {key}={_format_param(value)} is out of range: allowed {allowed}")


# --- baselines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity(Codec):
    name: str = field(default="f16", compare=False)
    KIND: ClassVar[str] = "f16"

    @property
    def description(self) -> str:
        return "uncompressed f16 values (the values are already f16, so the round trip is exact)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        _check_layer(x, 1)
        _check_role(role)
        return x.copy(), 2 * x.size


@dataclass(frozen=True)
class Eviction(Codec):
    name: str = field(default="evict", compare=False)
    KIND: ClassVar[str] = "evict"
    evicts = True

    @property
    def description(self) -> str:
        return "old tokens are removed from the cache (roundtrip alone returns zeros)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        _check_layer(x, 1)
        _check_role(role)
        return np.zeros_like(x), 0


@dataclass(frozen=True)
class _GgmlBlockQuant(Codec):
    """ggml's reference quantizer on blocks of 32 consecutive values of each token's row."""

    hadamard: bool = False
    name: str = field(default="", compare=False)
    BLOCK_BYTES: ClassVar[int]
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {"hadamard": _parse_flag}

    def __post_init__(self) -> None:
        self._set_default_name()

    @property
    def description(self) -> str:
        rotation = ", after a Hadamard rotation of each head as llama.cpp does" if self.hadamard else ""
        return f"ggml {self.KIND} ({self.BLOCK_BYTES * 8 / 32:g} bits/element, quantize_row_{self.KIND}_ref){rotation}"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        _check_layer(x, 1)
        _check_role(role)
        head_dim = x.shape[2]
        if head_dim % 32:
            raise ValueError(f"{self.KIND} needs head_dim divisible by 32, got {head_dim}")
        y = hadamard_rotate(x, head_dim) if self.hadamard else x
        decoded = self._quant_dequant(y.reshape(-1, 32)).reshape(x.shape)
        if self.hadamard:
            decoded = hadamard_rotate(decoded, head_dim)
        return decoded, x.size // 32 * self.BLOCK_BYTES

    def _quant_dequant(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in float32."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


@dataclass(frozen=True)
class Q8_0(_GgmlBlockQuant):
    KIND: ClassVar[str] = "q8_0"
    BLOCK_BYTES: ClassVar[int] = 34  # f16 scale + 32 int8

    def _quant_dequant(self, rows: np.ndarray) -> np.ndarray:
        amax = np.abs(rows).max(axis=1, keepdims=True)
        d = amax / np.float32(127)
        scaled = rows * _inverse_or_zero(d)
        # roundf: half away from zero; the +0.5 is exact in float64
        q = np.copysign(np.floor(np.abs(scaled).astype(np.float64) + 0.5), scaled).astype(np.int8)
        return q.astype(np.float32) * d.astype(np.float16).astype(np.float32)


@dataclass(frozen=True)
class Q4_0(_GgmlBlockQuant):
    KIND: ClassVar[str] = "q4_0"
    BLOCK_BYTES: ClassVar[int] = 18  # f16 scale + 32 nibbles

    def _quant_dequant(self, rows: np.ndarray) -> np.ndarray:
        # the signed value of largest magnitude, first one on ties, maps to -8
        first_max = np.abs(rows).argmax(axis=1)[:, None]
        d = np.take_along_axis(rows, first_max, axis=1) / np.float32(-8)
        q = np.minimum(15, np.trunc(rows * _inverse_or_zero(d) + np.float32(8.5)).astype(np.int8))
        return (q.astype(np.int32) - 8).astype(np.float32) * d.astype(np.float16).astype(np.float32)


def _asymmetric_quant_dequant(x: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Min/max quantization of groups along `axis`; min and step are stored (and used) as f16."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    levels = (1 << bits) - 1
    zero = lo.astype(np.float16).astype(np.float32)
    step = ((hi - lo) / np.float32(levels)).astype(np.float16).astype(np.float32)
    safe_step = np.where(step > 0, step, np.float32(1))
    q = np.where(step > 0, np.clip(np.rint((x - zero) / safe_step), 0, levels), 0).astype(np.int32)
    return q.astype(np.float32) * step + zero


@dataclass(frozen=True)
class Kivi(Codec):
    """KIVI-style: K per channel over groups of `group` tokens, V per token over groups of `group` channels."""

    bits: int = 4
    group: int = 32
    name: str = field(default="", compare=False)
    KIND: ClassVar[str] = "kivi"
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {"bits": int, "group": int}

    def __post_init__(self) -> None:
        _require(2 <= self.bits <= 8, self.KIND, "bits", self.bits, "2 to 8")
        _require(1 <= self.group <= 4096, self.KIND, "group", self.group, "1 to 4096")
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return self.group

    @property
    def description(self) -> str:
        return (f"KIVI-style {self.bits}-bit asymmetric quantization, K per channel over {self.group} tokens, "
                f"V per token over {self.group} channels, f16 min and step per group")

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        _check_layer(x, self.block_tokens)
        _check_role(role)
        n, heads, head_dim = x.shape
        channels = heads * head_dim
        if role == "k":
            grouped = x.reshape(n // self.group, self.group, channels)
            decoded = _asymmetric_quant_dequant(grouped, 1, self.bits)
        else:
            if channels % self.group:
                raise ValueError(f"kivi: group={self.group} does not divide the {channels} channels")
            grouped = x.reshape(n, channels // self.group, self.group)
            decoded = _asymmetric_quant_dequant(grouped, 2, self.bits)
        n_groups = x.size // self.group
        return decoded.reshape(x.shape), 4 * n_groups + (x.size * self.bits + 7) // 8


@dataclass(frozen=True)
class Pooling(Codec):
    """Keeps only the Haar approximation band: every token of a 2^levels block becomes the block mean.

    (A_L of the orthonormal Haar transform is the mean times 2^(L/2); storing the mean keeps it in f16 range.)
    """

    levels: int = 1
    name: str = field(default="", compare=False)
    KIND: ClassVar[str] = "pool"
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {"levels": int}

    def __post_init__(self) -> None:
        _require(1 <= self.levels <= 8, self.KIND, "levels", self.levels, "1 to 8")
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return 1 << self.levels

    @property
    def description(self) -> str:
        return f"mean of every {self.block_tokens} tokens kept as f16 (Haar approximation band, details dropped)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        _check_layer(x, self.block_tokens)
        _check_role(role)
        n, heads, head_dim = x.shape
        blocks = x.reshape(n // self.block_tokens, self.block_tokens, heads, head_dim)
        means = blocks.astype(np.float64).mean(axis=1).astype(np.float16)
        return np.repeat(means.astype(np.float32), self.block_tokens, axis=0), 2 * means.size


# --- the wavelet block codec -------------------------------------------------------------------

MAGIC = 0x57  # 'W'
VERSION = 1
MAX_LEVELS = 8
MAX_BITS = 16


def _f16_round_up(d: np.ndarray) -> np.ndarray:
    """f16 bit patterns of the smallest f16 >= d (d >= 0 finite float32), saturated at the largest finite f16."""
    clipped = np.minimum(d, F16_MAX)
    nearest = clipped.astype(np.float16)  # round to nearest even
    bits = nearest.view(np.uint16)
    return np.where(nearest.astype(np.float32) < clipped, bits + np.uint16(1), bits).astype(np.uint16)


@dataclass
class _Band:
    """One subband of n blocks, quantized. Absent groups have q = 0 and scale bits 0."""

    bits: int
    present: np.ndarray  # bool (n_blocks, rows, n_groups)
    scale_bits: np.ndarray  # uint16 f16 patterns (n_blocks, rows, n_groups)
    q: np.ndarray  # int32 (n_blocks, rows, n_groups, group)


# Subband widths of the named presets: A_L, then details D_1 (finest), D_2, D_3, D_4 and coarser.
# Chosen with `kvggml eval` on SmolLM2 (README, "Presets"); the library reads the same table
# (kvggml/csrc/config.cpp) for OLLAMA_KV_COMPRESSION_PRESET.
PRESETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "hi": (8, (4, 5, 6, 7)),
    "balanced": (6, (3, 3, 3, 4)),
    "lo": (4, (3, 3, 3, 3)),
}


def preset_bits(preset: str, levels: int) -> tuple[int, ...]:
    """Widths [A_L, D_L, ..., D_1] of a preset at `levels` levels."""
    approximation, detail = PRESETS[preset]
    return (approximation, *(detail[min(j, 4) - 1] for j in range(levels, 0, -1)))


@dataclass(frozen=True)
class HaarCodec(Codec):
    """Hadamard rotation per head, L-level Haar along tokens, per-subband symmetric quantization.

    A block is B = 2^levels tokens x C channels (C = n_heads * head_dim), serialized as in
    docs/FORMAT.md. `bits` gives the width of [A_L, D_L, ..., D_1] (0 drops the subband, 2..16;
    default: the "balanced" preset at these levels);
    one f16 scale per group of `group` channels in one row of a subband. A detail group whose
    max |coefficient| is <= threshold x (max |A_L| over the same channels in the block) is
    dropped; threshold 0 drops only all-zero groups, which is lossless.
    """

    levels: int = 4
    bits: tuple[int, ...] | None = None
    hadamard: bool = True
    group: int = 64
    threshold: float = 0.0
    name: str = field(default="", compare=False)
    KIND: ClassVar[str] = "haar"
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {
        "levels": int, "bits": _parse_dotted, "hadamard": _parse_flag, "group": int, "threshold": _parse_float}

    def __post_init__(self) -> None:
        _require(0 <= self.levels <= MAX_LEVELS, self.KIND, "levels", self.levels, f"0 to {MAX_LEVELS}")
        bits = preset_bits("balanced", self.levels) if self.bits is None else tuple(self.bits)
        object.__setattr__(self, "bits", bits)
        _require(len(self.bits) == self.levels + 1, self.KIND, "bits", self.bits,
                 f"exactly levels+1 = {self.levels + 1} dot-separated widths (A_L, D_L, ..., D_1)")
        _require(all(b == 0 or 2 <= b <= MAX_BITS for b in self.bits), self.KIND, "bits", self.bits,
                 f"widths 0 (subband dropped) or 2 to {MAX_BITS}")
        _require(1 <= self.group <= 0xFFFF, self.KIND, "group", self.group, "1 to 65535, dividing the channels")
        _require(math.isfinite(self.threshold) and self.threshold >= 0, self.KIND, "threshold", self.threshold,
                 "a finite number >= 0")
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return 1 << self.levels

    @property
    def description(self) -> str:
        rotation = "Hadamard per head, " if self.hadamard else ""
        dropping = f", detail groups below {self.threshold:g} x A_L level dropped" if self.threshold else ""
        return (f"{rotation}{self.levels}-level Haar over {self.block_tokens} tokens, subband bits "
                f"{'.'.join(map(str, self.bits))}, f16 scale per {self.group} channels{dropping}")

    def bits_per_element(self, n_heads: int = 4, head_dim: int = 64) -> float:
        return Codec.bits_per_element(replace(self, threshold=0.0), n_heads, head_dim)

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        """All blocks of a layer at once; equal to decoding each encode_block, size = sum of their lengths."""
        _check_layer(x, self.block_tokens)
        _check_role(role)
        n, heads, head_dim = x.shape
        blocks = x.reshape(n // self.block_tokens, self.block_tokens, heads * head_dim)
        bands = self._quantize(blocks, head_dim)
        rotation = self._rotation(heads * head_dim, head_dim)
        decoded = _reconstruct(bands, len(blocks), self.levels, heads * head_dim, self.group, rotation)
        return decoded.reshape(x.shape), int(_block_sizes(bands, len(blocks), self.levels).sum())

    def encode_block(self, block: np.ndarray, head_dim: int) -> bytes:
        """Serialize one float32 (B, C) block; C = n_heads * head_dim. Format: docs/FORMAT.md."""
        if not isinstance(block, np.ndarray) or block.dtype != np.float32 or block.ndim != 2 \
                or block.shape[0] != self.block_tokens:
            raise ValueError(f"expected a float32 block of shape ({self.block_tokens}, C), got "
                             f"{getattr(block, 'dtype', type(block).__name__)} {getattr(block, 'shape', '')}")
        if not np.isfinite(block).all():
            raise ValueError("block holds non-finite values")
        channels = block.shape[1]
        bands = self._quantize(block[None], head_dim)
        rotation = self._rotation(channels, head_dim)
        header = bytes([MAGIC, VERSION, self.levels, rotation.bit_length() - 1])
        header += channels.to_bytes(2, "little") + self.group.to_bytes(2, "little") + bytes(self.bits)
        coded = [band for band in bands if band is not None]
        bitmap = np.concatenate([np.zeros(0, bool)] + [band.present[0].ravel() for band in coded])
        scales = np.concatenate([np.zeros(0, np.uint16)] + [band.scale_bits[0][band.present[0]] for band in coded])
        data_bits = [np.zeros(0, np.uint8)]
        for band in coded:
            values = band.q[0][band.present[0]].ravel() & ((1 << band.bits) - 1)  # two's complement in `bits` bits
            data_bits.append(((values[:, None] >> np.arange(band.bits)) & 1).astype(np.uint8).ravel())
        return (header + np.packbits(bitmap, bitorder="little").tobytes() + scales.astype("<u2").tobytes()
                + np.packbits(np.concatenate(data_bits), bitorder="little").tobytes())

    def _rotation(self, channels: int, head_dim: int) -> int:
        """Hadamard length: head_dim, or 1 (identity) without Hadamard."""
        if channels > 0xFFFF or channels % self.group:
            raise ValueError(f"haar: group={self.group} must divide the channels, and channels <= 65535; "
                             f"got {channels} channels")
        if not self.hadamard:
            return 1
        if head_dim < 1 or head_dim & (head_dim - 1) or channels % head_dim or head_dim > 1 << 15:
            raise ValueError(f"haar: Hadamard needs head_dim a power of two (<= 32768) dividing the {channels} "
                             f"channels, got head_dim={head_dim}")
        return head_dim

    def _quantize(self, blocks: np.ndarray, head_dim: int) -> list[_Band | None]:
        """Quantized subbands [A_L, D_L, ..., D_1] of float32 (n_blocks, B, C); None for dropped ones."""
        n_blocks, n_rows, channels = blocks.shape
        rotation = self._rotation(channels, head_dim)
        rotated = hadamard_rotate(blocks, rotation) if rotation > 1 else blocks
        coef = haar_forward(rotated, self.levels, axis=1).reshape(n_blocks, n_rows, channels // self.group, self.group)
        amax = np.abs(coef).max(axis=3)
        slices = subband_slices(n_rows, self.levels)
        approx_level = amax[:, slices[0]].max(axis=1, keepdims=True)
        detail_limit = np.float32(self.threshold) * approx_level
        bands: list[_Band | None] = []
        for index, (rows, bits) in enumerate(zip(slices, self.bits)):
            if bits == 0:
                bands.append(None)
                continue
            group_max = amax[:, rows]
            present = group_max > (0 if index == 0 else detail_limit)
            qmax = (1 << (bits - 1)) - 1
            scale_bits = np.where(present, _f16_round_up(group_max / np.float32(qmax)), np.uint16(0))
            divisor = np.where(present, f16_bits_to_f32(scale_bits), np.float32(1))
            q = np.clip(np.rint(coef[:, rows] / divisor[..., None]), -qmax, qmax).astype(np.int32)
            q[~present] = 0
            bands.append(_Band(bits, present, scale_bits.astype(np.uint16), q))
        return bands


def _reconstruct(bands: list[_Band | None], n_blocks: int, levels: int, channels: int, group: int,
                 rotation: int) -> np.ndarray:
    """Decoded float32 (n_blocks, B, C) from quantized subbands: q * scale, inverse Haar, inverse Hadamard."""
    n_rows = 1 << levels
    coef = np.zeros((n_blocks, n_rows, channels // group, group), np.float32)
    for rows, band in zip(subband_slices(n_rows, levels), bands):
        if band is not None:
            coef[:, rows] = band.q.astype(np.float32) * f16_bits_to_f32(band.scale_bits)[..., None]
    decoded = haar_inverse(coef.reshape(n_blocks, n_rows, channels), levels, axis=1)
    return hadamard_rotate(decoded, rotation) if rotation > 1 else decoded


def _block_sizes(bands: list[_Band | None], n_blocks: int, levels: int) -> np.ndarray:
    """Serialized length in bytes of each block."""
    coded = [band for band in bands if band is not None]
    header = 9 + levels
    if not coded:
        return np.full(n_blocks, header)
    bitmap_bits = sum(band.present[0].size for band in coded)
    present = [band.present.sum(axis=(1, 2)) for band in coded]
    data_bits = sum(p * band.q.shape[3] * band.bits for p, band in zip(present, coded))
    return header + (bitmap_bits + 7) // 8 + 2 * sum(present) + (data_bits + 7) // 8


def decode_block(data: bytes) -> np.ndarray:
    """Decode one serialized block (docs/FORMAT.md) to float32 (B, C); ValueError names what is malformed."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError(f"truncated header: {len(data)} bytes, the fixed header alone is 8")
    magic, version, levels, rotation_log2 = data[:4]
    channels = int.from_bytes(data[4:6], "little")
    group = int.from_bytes(data[6:8], "little")
    if magic != MAGIC:
        raise ValueError(f"bad magic byte 0x{magic:02X}, expected 0x{MAGIC:02X}")
    if version != VERSION:
        raise ValueError(f"unsupported version {version}, expected {VERSION}")
    if levels > MAX_LEVELS:
        raise ValueError(f"levels {levels} out of range 0 to {MAX_LEVELS}")
    if channels == 0 or group == 0 or channels % group:
        raise ValueError(f"inconsistent sizes: group {group} must be >= 1 and divide channels {channels} (>= 1)")
    if rotation_log2 > 15 or channels % (1 << rotation_log2):
        raise ValueError(f"inconsistent sizes: Hadamard length 2^{rotation_log2} does not divide channels {channels}")
    header_len = 9 + levels
    if len(data) < header_len:
        raise ValueError(f"truncated header: {len(data)} bytes, levels {levels} needs {header_len}")
    widths = list(data[8:header_len])
    for subband, bits in enumerate(widths):
        if bits == 1 or bits > MAX_BITS:
            raise ValueError(f"bits out of range: subband {subband} has width {bits}, allowed 0 or 2 to {MAX_BITS}")

    n_rows, n_groups = 1 << levels, channels // group
    slices = subband_slices(n_rows, levels)
    shapes = [(sl.stop - sl.start, n_groups) for sl, bits in zip(slices, widths) if bits]
    bitmap_bits = sum(rows * groups for rows, groups in shapes)
    pos = header_len + (bitmap_bits + 7) // 8
    if len(data) < pos:
        raise ValueError(f"truncated presence bitmap: {len(data)} bytes, at least {pos} needed")
    bitmap = np.unpackbits(np.frombuffer(data, np.uint8, pos - header_len, header_len), bitorder="little")
    if bitmap[bitmap_bits:].any():
        raise ValueError("nonzero padding bits after the presence bitmap")
    present = bitmap[:bitmap_bits].astype(bool)
    n_present = int(present.sum())

    if len(data) < pos + 2 * n_present:
        raise ValueError(f"truncated scales: {len(data)} bytes, at least {pos + 2 * n_present} needed")
    scales = np.frombuffer(data, "<u2", n_present, pos).astype(np.uint16)
    pos += 2 * n_present
    if ((scales & 0x7C00) == 0x7C00).any():
        raise ValueError("non-finite scale (f16 infinity or NaN)")
    if ((scales & 0x8000) | (scales == 0)).any():
        raise ValueError("non-positive scale (present groups have scales > 0)")

    coded_widths = [bits for bits in widths if bits]
    present_per_band = np.split(present, np.cumsum([rows * groups for rows, groups in shapes])[:-1])
    data_bits = sum(int(p.sum()) * group * bits for p, bits in zip(present_per_band, coded_widths))
    expected = pos + (data_bits + 7) // 8
    if len(data) < expected:
        raise ValueError(f"truncated data: {len(data)} bytes, expected {expected}")
    if len(data) > expected:
        raise ValueError(f"trailing bytes: {len(data)} bytes, expected {expected}")
    stream = np.unpackbits(np.frombuffer(data, np.uint8, offset=pos), bitorder="little")
    if stream[data_bits:].any():
        raise ValueError("nonzero padding bits after the quantized values")

    bands: list[_Band | None] = []
    coded = iter(zip(shapes, present_per_band))
    scale_pos = bit_pos = 0
    for bits in widths:
        if bits == 0:
            bands.append(None)
            continue
        (rows, groups), band_present = next(coded)
        band_present = band_present.reshape(1, rows, groups)
        count = int(band_present.sum())
        scale_bits = np.zeros((1, rows, groups), np.uint16)
        scale_bits[band_present] = scales[scale_pos : scale_pos + count]
        scale_pos += count
        chunk = stream[bit_pos : bit_pos + count * group * bits].reshape(-1, bits).astype(np.int32)
        bit_pos += count * group * bits
        unsigned = (chunk << np.arange(bits)).sum(axis=1)
        values = unsigned - ((unsigned >> (bits - 1)) << bits)
        if (values == -(1 << (bits - 1))).any():
            raise ValueError(f"quantized value {-(1 << (bits - 1))} out of range for a {bits}-bit subband "
                             f"(allowed -{(1 << (bits - 1)) - 1} to {(1 << (bits - 1)) - 1})")
        q = np.zeros((1, rows, groups, group), np.int32)
        q[band_present] = values.reshape(count, group)
        bands.append(_Band(bits, band_present, scale_bits, q))
    return _reconstruct(bands, 1, levels, channels, group, 1 << rotation_log2)[0]


# --- registry -----------------------------------------------------------------------------------

CODECS: dict[str, Codec] = {codec.name: codec for codec in (
    Identity(),
    Q8_0(name="q8_0"), Q4_0(name="q4_0"), Q8_0(hadamard=True, name="q8_0+hadamard"), Q4_0(hadamard=True, name="q4_0+hadamard"),
    Kivi(bits=4, name="kivi4"), Kivi(bits=2, name="kivi2"),
    Pooling(levels=1, name="pool2"), Pooling(levels=2, name="pool4"),
    Eviction(),
    HaarCodec(bits=preset_bits("hi", 4), name="haar-hi"),
    HaarCodec(name="haar"),
    HaarCodec(bits=preset_bits("lo", 4), name="haar-lo"),
    HaarCodec(hadamard=False, name="haar-noH"),
    HaarCodec(bits=(16,) * 5, group=32, name="haar-16"),
)}

_KINDS: dict[str, type[Codec]] = {cls.KIND: cls for cls in (Identity, Eviction, Q8_0, Q4_0, Kivi, Pooling, HaarCodec)}


def parse_codec(spec: str) -> Codec:
    """A registry name (see CODECS) or `kind:field=value,...`, e.g. `haar:levels=4,bits=8.6.5.4.3,group=64`."""
    spec = spec.strip()
    if spec in CODECS:
        return CODECS[spec]
    kind, _, params = spec.partition(":")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown codec {spec!r}: expected a name ({', '.join(CODECS)}) "
                         f"or kind:field=value,... with kind one of {', '.join(_KINDS)}")
    kwargs: dict[str, object] = {}
    for item in filter(None, params.split(",")):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or key not in cls.SPEC_FIELDS:
            allowed = ", ".join(cls.SPEC_FIELDS) or "no fields"
            raise ValueError(f"{spec!r}: unknown field {key!r}: {kind} takes {allowed}")
        if key in kwargs:
            raise ValueError(f"{spec!r}: field {key!r} given twice")
        try:
            kwargs[key] = cls.SPEC_FIELDS[key](raw)
        except ValueError as err:
            raise ValueError(f"{spec!r}: {key}={raw!r} is not valid ({err})") from None
    return cls(**kwargs)
