"""The normalised Walsh–Hadamard rotation of docs/FORMAT.md, section 2 (numpy reference)."""

from __future__ import annotations

import math

import numpy as np


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
