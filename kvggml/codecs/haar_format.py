"""The wavelet block's byte format, version 1 (docs/FORMAT.md): quantization, layout, size and decoding.

What the C implementation must match bit for bit lives here; what an encoder may choose (rotation
or not, widths, group size, which detail groups to drop) is `HaarCodec`'s, in haar.py.
Quantized subbands travel as `Band`s with a leading axis of blocks, so one layer's blocks are
quantized, sized and reconstructed at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvggml.codecs.hadamard import hadamard_rotate
from kvggml.wavelet import haar_inverse, subband_slices

MAGIC = 0x57  # 'W'
VERSION = 1
MAX_LEVELS = 8
MAX_BITS = 16
F16_MAX = np.float32(65504.0)


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def f16_round_up(d: np.ndarray) -> np.ndarray:
    """f16 bit patterns of the smallest f16 >= d (d >= 0 finite float32), saturated at the largest finite f16."""
    clipped = np.minimum(d, F16_MAX)
    nearest = clipped.astype(np.float16)  # round to nearest even
    bits = nearest.view(np.uint16)
    return np.where(nearest.astype(np.float32) < clipped, bits + np.uint16(1), bits).astype(np.uint16)


@dataclass
class Band:
    """One subband of n blocks, quantized. Absent groups have q = 0 and scale bits 0."""

    bits: int
    present: np.ndarray  # bool (n_blocks, rows, n_groups)
    scale_bits: np.ndarray  # uint16 f16 patterns (n_blocks, rows, n_groups)
    q: np.ndarray  # int32 (n_blocks, rows, n_groups, group)


def quantize_band(coef: np.ndarray, group_max: np.ndarray, present: np.ndarray, bits: int) -> Band:
    """Section 4: float32 coefficients (n_blocks, rows, n_groups, group) quantized to `bits`.

    group_max, present: (n_blocks, rows, n_groups), each group's max |coefficient| and whether it is stored.
    """
    qmax = (1 << (bits - 1)) - 1
    scale_bits = np.where(present, f16_round_up(group_max / np.float32(qmax)), np.uint16(0))
    divisor = np.where(present, f16_bits_to_f32(scale_bits), np.float32(1))
    q = np.clip(np.rint(coef / divisor[..., None]), -qmax, qmax).astype(np.int32)
    q[~present] = 0
    return Band(bits, present, scale_bits.astype(np.uint16), q)


def pack_block(bands: list[Band | None], channels: int, group: int, rotation: int) -> bytes:
    """Section 6: the bytes of one block from its subbands [A_L, D_L, ..., D_1] (None: width 0)."""
    widths = [0 if band is None else band.bits for band in bands]
    header = bytes([MAGIC, VERSION, len(bands) - 1, rotation.bit_length() - 1])
    header += channels.to_bytes(2, "little") + group.to_bytes(2, "little") + bytes(widths)
    coded = [band for band in bands if band is not None]
    bitmap = np.concatenate([np.zeros(0, bool)] + [band.present[0].ravel() for band in coded])
    scales = np.concatenate([np.zeros(0, np.uint16)] + [band.scale_bits[0][band.present[0]] for band in coded])
    data_bits = [np.zeros(0, np.uint8)]
    for band in coded:
        values = band.q[0][band.present[0]].ravel() & ((1 << band.bits) - 1)  # two's complement in `bits` bits
        data_bits.append(((values[:, None] >> np.arange(band.bits)) & 1).astype(np.uint8).ravel())
    return (
        header
        + np.packbits(bitmap, bitorder="little").tobytes()
        + scales.astype("<u2").tobytes()
        + np.packbits(np.concatenate(data_bits), bitorder="little").tobytes()
    )


def block_sizes(bands: list[Band | None], n_blocks: int, levels: int) -> np.ndarray:
    """Serialized length in bytes of each block."""
    coded = [band for band in bands if band is not None]
    header = 9 + levels
    if not coded:
        return np.full(n_blocks, header)
    bitmap_bits = sum(band.present[0].size for band in coded)
    present = [band.present.sum(axis=(1, 2)) for band in coded]
    data_bits = sum(p * band.q.shape[3] * band.bits for p, band in zip(present, coded, strict=True))
    return header + (bitmap_bits + 7) // 8 + 2 * sum(present) + (data_bits + 7) // 8


def reconstruct(
    bands: list[Band | None], n_blocks: int, levels: int, channels: int, group: int, rotation: int
) -> np.ndarray:
    """Decoded float32 (n_blocks, B, C) from quantized subbands: q * scale, inverse Haar, inverse Hadamard."""
    n_rows = 1 << levels
    coef = np.zeros((n_blocks, n_rows, channels // group, group), np.float32)
    for rows, band in zip(subband_slices(n_rows, levels), bands, strict=True):
        if band is not None:
            coef[:, rows] = band.q.astype(np.float32) * f16_bits_to_f32(band.scale_bits)[..., None]
    decoded = haar_inverse(coef.reshape(n_blocks, n_rows, channels), levels, axis=1)
    return hadamard_rotate(decoded, rotation) if rotation > 1 else decoded


@dataclass
class ParsedBlock:
    """One serialized block, checked (section 7): its header and its quantized subbands."""

    levels: int
    channels: int
    group: int
    rotation: int
    bands: list[Band | None]  # [A_L, D_L, ..., D_1], each with one block; None: width 0

    def decode(self) -> np.ndarray:
        return reconstruct(self.bands, 1, self.levels, self.channels, self.group, self.rotation)[0]

    def pack(self) -> bytes:
        return pack_block(self.bands, self.channels, self.group, self.rotation)


def coarsen_bands(bands: list[Band | None], bits: tuple[int, ...]) -> list[Band | None]:
    """Section 10: subbands narrowed to `bits` from their stored coefficients (any number of blocks)."""
    if len(bits) != len(bands):
        raise ValueError(f"coarsening needs {len(bands)} widths (A_L, D_L, ..., D_1), got {len(bits)}")
    out: list[Band | None] = []
    for index, (band, width) in enumerate(zip(bands, bits, strict=True)):
        have = 0 if band is None else band.bits
        if width == 1 or width > have:
            raise ValueError(
                f"bits out of range: subband {index} cannot go from width {have} to {width} (allowed 0, or 2 to {have})"
            )
        if width == have or band is None:
            out.append(band if width else None)
        elif width == 0:
            out.append(None)
        else:
            coef = band.q.astype(np.float32) * f16_bits_to_f32(band.scale_bits)[..., None]
            group_max = np.abs(coef).max(axis=3)
            out.append(quantize_band(coef, group_max, group_max > 0, width))
    return out


def coarsen_block(data: bytes, bits: tuple[int, ...], channels: tuple[int, int] | None = None) -> bytes:
    """One serialized block re-encoded with narrower subbands (section 10), or with subbands dropped
    from the channels [c0, c1) only (section 11: each width 0 or the block's own)."""
    block = parse_block(data)
    c0, c1 = (0, block.channels) if channels is None else channels
    if not (0 <= c0 < c1 <= block.channels) or c0 % block.group or c1 % block.group:
        raise ValueError(
            f"channel range [{c0}, {c1}) not allowed: multiples of the group size {block.group} "
            f"within 0 to {block.channels}"
        )
    if (c0, c1) == (0, block.channels):
        block.bands = coarsen_bands(block.bands, tuple(bits))
    else:
        block.bands = drop_from_channels(block.bands, tuple(bits), (c0 // block.group, c1 // block.group))
    return block.pack()


def drop_from_channels(bands: list[Band | None], bits: tuple[int, ...], groups: tuple[int, int]) -> list[Band | None]:
    """Section 11: the subbands of width 0 in `bits` dropped from the groups [g0, g1) of every row."""
    g0, g1 = groups
    if len(bits) != len(bands):
        raise ValueError(f"coarsening needs {len(bands)} widths (A_L, D_L, ..., D_1), got {len(bits)}")
    out: list[Band | None] = []
    for index, (band, width) in enumerate(zip(bands, bits, strict=True)):
        have = 0 if band is None else band.bits
        if width not in (0, have):
            raise ValueError(
                f"bits out of range: subband {index} of width {have} can only be dropped (0) from a channel range, "
                f"not {width}"
            )
        if band is None or width:
            out.append(band)
            continue
        present = band.present.copy()
        present[:, :, g0:g1] = False
        if not present.any():
            out.append(None)
            continue
        q = np.where(present[..., None], band.q, 0).astype(np.int32)
        out.append(Band(band.bits, present, np.where(present, band.scale_bits, np.uint16(0)).astype(np.uint16), q))
    return out


def decode_block(data: bytes) -> np.ndarray:
    """Decode one serialized block (docs/FORMAT.md) to float32 (B, C); ValueError names what is malformed."""
    return parse_block(data).decode()


def parse_block(data: bytes) -> ParsedBlock:
    """Check one serialized block (section 7) and read its subbands; ValueError names what is malformed."""
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
    shapes = [(sl.stop - sl.start, n_groups) for sl, bits in zip(slices, widths, strict=True) if bits]
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
    data_bits = sum(int(p.sum()) * group * bits for p, bits in zip(present_per_band, coded_widths, strict=False))
    expected = pos + (data_bits + 7) // 8
    if len(data) < expected:
        raise ValueError(f"truncated data: {len(data)} bytes, expected {expected}")
    if len(data) > expected:
        raise ValueError(f"trailing bytes: {len(data)} bytes, expected {expected}")
    stream = np.unpackbits(np.frombuffer(data, np.uint8, offset=pos), bitorder="little")
    if stream[data_bits:].any():
        raise ValueError("nonzero padding bits after the quantized values")

    bands: list[Band | None] = []
    coded = iter(zip(shapes, present_per_band, strict=False))
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
            raise ValueError(
                f"quantized value {-(1 << (bits - 1))} out of range for a {bits}-bit subband "
                f"(allowed -{(1 << (bits - 1)) - 1} to {(1 << (bits - 1)) - 1})"
            )
        q = np.zeros((1, rows, groups, group), np.int32)
        q[band_present] = values.reshape(count, group)
        bands.append(Band(bits, band_present, scale_bits, q))
    return ParsedBlock(levels, channels, group, 1 << rotation_log2, bands)
