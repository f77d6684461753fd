"""Multi-level orthonormal Haar transform along the token axis (numpy reference).

A block holds B = 2^k tokens. One Haar step maps each pair of rows
(x[2i], x[2i+1]) to

    a[i] = (x[2i] + x[2i+1]) * s        d[i] = (x[2i] - x[2i+1]) * s

with s = 1/sqrt(2) rounded to the working dtype (float32: 0x3F3504F3), one
rounding per operation, in exactly that order (no fused multiply-add), so a C
implementation reproduces float32 results bit for bit (docs/FORMAT.md, section 3).
The inverse step is x[2i] = (a + d) * s, x[2i+1] = (a - d) * s.

Level l transforms the approximation rows left by level l-1. Coefficients use
the Mallat layout along the transformed axis:

    [A_L (B/2^L rows), D_L (B/2^L rows), D_{L-1} (B/2^{L-1} rows), ..., D_1 (B/2 rows)]

Many blocks at once: reshape (n_blocks * B, ...) to (n_blocks, B, ...) and pass
axis=1; every block is transformed independently. Arrays keep their floating
dtype (float32 is computed in float32, float64 in float64).
"""

from __future__ import annotations

import math

import numpy as np


def _check(x: np.ndarray, levels: int, axis: int) -> int:
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Haar transform needs a floating-point array, got {x.dtype}")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    n = x.shape[axis]
    if n % (1 << levels):
        raise ValueError(f"block of {n} tokens is not divisible by 2**levels = {1 << levels} (levels={levels})")
    return n


def _scale(dtype: np.dtype) -> np.floating:
    return dtype.type(1 / math.sqrt(2))


def haar_forward(x: np.ndarray, levels: int, axis: int = 0) -> np.ndarray:
    """Coefficients of an L-level Haar transform of x along `axis`, same shape and dtype, Mallat layout."""
    n = _check(x, levels, axis)
    s = _scale(x.dtype)
    out = np.moveaxis(np.array(x, copy=True), axis, 0)
    for level in range(1, levels + 1):
        rows = n >> (level - 1)
        even, odd = out[0:rows:2], out[1:rows:2]
        approx, detail = (even + odd) * s, (even - odd) * s
        out[: rows // 2], out[rows // 2 : rows] = approx, detail
    return np.moveaxis(out, 0, axis)


def haar_inverse(c: np.ndarray, levels: int, axis: int = 0) -> np.ndarray:
    """Inverse of haar_forward: c holds Mallat-layout coefficients along `axis`."""
    n = _check(c, levels, axis)
    s = _scale(c.dtype)
    out = np.moveaxis(np.array(c, copy=True), axis, 0)
    for level in range(levels, 0, -1):
        rows = n >> (level - 1)
        approx, detail = out[: rows // 2], out[rows // 2 : rows]
        even, odd = (approx + detail) * s, (approx - detail) * s
        out[0:rows:2], out[1:rows:2] = even, odd
    return np.moveaxis(out, 0, axis)


def subband_slices(block_tokens: int, levels: int) -> list[slice]:
    """Row ranges of the subbands [A_L, D_L, D_{L-1}, ..., D_1] in a Mallat-layout block."""
    if levels < 0 or block_tokens <= 0 or block_tokens % (1 << levels):
        raise ValueError(
            f"block of {block_tokens} tokens is not divisible by 2**levels = {1 << max(levels, 0)} (levels={levels})"
        )
    coarsest = block_tokens >> levels
    slices = [slice(0, coarsest)]
    for level in range(levels, 0, -1):
        start = block_tokens >> level
        slices.append(slice(start, 2 * start))
    return slices
