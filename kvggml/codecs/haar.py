"""The wavelet block codec: Hadamard rotation per head, Haar along tokens, per-subband quantization.

Its byte format is haar_format.py (docs/FORMAT.md); this module holds the encoder's choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role, parse_dotted, parse_flag, parse_float, require
from kvggml.codecs.haar_format import (
    MAX_BITS,
    MAX_LEVELS,
    Band,
    block_sizes,
    coarsen_bands,
    pack_block,
    quantize_band,
    reconstruct,
)
from kvggml.codecs.hadamard import hadamard_rotate
from kvggml.presets import preset_bits
from kvggml.wavelet import haar_forward, subband_slices


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
        "levels": int,
        "bits": parse_dotted,
        "hadamard": parse_flag,
        "group": int,
        "threshold": parse_float,
    }

    def __post_init__(self) -> None:
        require(0 <= self.levels <= MAX_LEVELS, self.KIND, "levels", self.levels, f"0 to {MAX_LEVELS}")
        bits = preset_bits("balanced", self.levels) if self.bits is None else tuple(self.bits)
        object.__setattr__(self, "bits", bits)
        require(
            len(self.bits) == self.levels + 1,
            self.KIND,
            "bits",
            self.bits,
            f"exactly levels+1 = {self.levels + 1} dot-separated widths (A_L, D_L, ..., D_1)",
        )
        require(
            all(b == 0 or 2 <= b <= MAX_BITS for b in self.bits),
            self.KIND,
            "bits",
            self.bits,
            f"widths 0 (subband dropped) or 2 to {MAX_BITS}",
        )
        require(1 <= self.group <= 0xFFFF, self.KIND, "group", self.group, "1 to 65535, dividing the channels")
        require(
            math.isfinite(self.threshold) and self.threshold >= 0,
            self.KIND,
            "threshold",
            self.threshold,
            "a finite number >= 0",
        )
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return 1 << self.levels

    @property
    def description(self) -> str:
        rotation = "Hadamard per head, " if self.hadamard else ""
        dropping = f", detail groups below {self.threshold:g} x A_L level dropped" if self.threshold else ""
        return (
            f"{rotation}{self.levels}-level Haar over {self.block_tokens} tokens, subband bits "
            f"{'.'.join(map(str, self.bits))}, f16 scale per {self.group} channels{dropping}"
        )

    def bits_per_element(self, n_heads: int = 4, head_dim: int = 64) -> float:
        return Codec.bits_per_element(replace(self, threshold=0.0), n_heads, head_dim)

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        """All blocks of a layer at once; equal to decoding each encode_block, size = sum of their lengths."""
        check_layer(x, self.block_tokens)
        check_role(role)
        n, heads, head_dim = x.shape
        blocks = x.reshape(n // self.block_tokens, self.block_tokens, heads * head_dim)
        bands = self._quantize(blocks, head_dim)
        rotation = self._rotation(heads * head_dim, head_dim)
        decoded = reconstruct(bands, len(blocks), self.levels, heads * head_dim, self.group, rotation)
        return decoded.reshape(x.shape), int(block_sizes(bands, len(blocks), self.levels).sum())

    def ladder(self, x: np.ndarray, widths: list[tuple[int, ...]]) -> list[list[Band | None]]:
        """Every block of a layer (n_tokens, n_heads, head_dim) quantized, then coarsened along `widths`
        one step at a time as the library does (docs/FORMAT.md, section 10): entry s is step s."""
        check_layer(x, self.block_tokens)
        n, heads, head_dim = x.shape
        steps = [self._quantize(x.reshape(n // self.block_tokens, self.block_tokens, heads * head_dim), head_dim)]
        for bits in widths:
            steps.append(coarsen_bands(steps[-1], tuple(min(a, b) for a, b in zip(bits, self.bits, strict=True))))
        return steps

    def ladder_sizes(self, ladder: list[list[Band | None]]) -> np.ndarray:
        """Bytes of each block at each step: (n_blocks, steps)."""
        n_blocks = next(band.q.shape[0] for band in ladder[0] if band is not None)
        return np.stack([block_sizes(bands, n_blocks, self.levels) for bands in ladder], axis=1)

    def decode_ladder(self, ladder: list[list[Band | None]], steps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The layer decoded with block b at step steps[b]."""
        n, heads, head_dim = shape
        out = np.empty((len(steps), self.block_tokens, heads * head_dim), np.float32)
        rotation = self._rotation(heads * head_dim, head_dim)
        for step, bands in enumerate(ladder):
            chosen = steps == step
            if chosen.any():
                picked = [
                    None if b is None else Band(b.bits, b.present[chosen], b.scale_bits[chosen], b.q[chosen])
                    for b in bands
                ]
                out[chosen] = reconstruct(
                    picked, int(chosen.sum()), self.levels, heads * head_dim, self.group, rotation
                )
        return out.reshape(shape)

    def encode_block(self, block: np.ndarray, head_dim: int) -> bytes:
        """Serialize one float32 (B, C) block; C = n_heads * head_dim. Format: docs/FORMAT.md."""
        if (
            not isinstance(block, np.ndarray)
            or block.dtype != np.float32
            or block.ndim != 2
            or block.shape[0] != self.block_tokens
        ):
            raise ValueError(
                f"expected a float32 block of shape ({self.block_tokens}, C), got "
                f"{getattr(block, 'dtype', type(block).__name__)} {getattr(block, 'shape', '')}"
            )
        if not np.isfinite(block).all():
            raise ValueError("block holds non-finite values")
        channels = block.shape[1]
        bands = self._quantize(block[None], head_dim)
        return pack_block(bands, channels, self.group, self._rotation(channels, head_dim))

    def _rotation(self, channels: int, head_dim: int) -> int:
        """Hadamard length: head_dim, or 1 (identity) without Hadamard."""
        if channels > 0xFFFF or channels % self.group:
            raise ValueError(
                f"haar: group={self.group} must divide the channels, and channels <= 65535; got {channels} channels"
            )
        if not self.hadamard:
            return 1
        if head_dim < 1 or head_dim & (head_dim - 1) or channels % head_dim or head_dim > 1 << 15:
            raise ValueError(
                f"haar: Hadamard needs head_dim a power of two (<= 32768) dividing the {channels} "
                f"channels, got head_dim={head_dim}"
            )
        return head_dim

    def _quantize(self, blocks: np.ndarray, head_dim: int) -> list[Band | None]:
        """Quantized subbands [A_L, D_L, ..., D_1] of float32 (n_blocks, B, C); None for dropped ones."""
        n_blocks, n_rows, channels = blocks.shape
        rotation = self._rotation(channels, head_dim)
        rotated = hadamard_rotate(blocks, rotation) if rotation > 1 else blocks
        coef = haar_forward(rotated, self.levels, axis=1).reshape(n_blocks, n_rows, channels // self.group, self.group)
        amax = np.abs(coef).max(axis=3)
        slices = subband_slices(n_rows, self.levels)
        # presence (docs/FORMAT.md, section 5): a detail group is kept above threshold x its channels' A_L level
        approx_level = amax[:, slices[0]].max(axis=1, keepdims=True)
        detail_limit = np.float32(self.threshold) * approx_level
        bands: list[Band | None] = []
        for index, (rows, bits) in enumerate(zip(slices, self.bits, strict=True)):
            if bits == 0:
                bands.append(None)
                continue
            present = amax[:, rows] > (0 if index == 0 else detail_limit)
            bands.append(quantize_band(coef[:, rows], amax[:, rows], present, bits))
        return bands
