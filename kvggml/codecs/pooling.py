"""Token pooling: the Haar approximation band alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role, require


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
        require(1 <= self.levels <= 8, self.KIND, "levels", self.levels, "1 to 8")
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return 1 << self.levels

    @property
    def description(self) -> str:
        return f"mean of every {self.block_tokens} tokens kept as f16 (Haar approximation band, details dropped)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_layer(x, self.block_tokens)
        check_role(role)
        n, heads, head_dim = x.shape
        blocks = x.reshape(n // self.block_tokens, self.block_tokens, heads, head_dim)
        means = blocks.astype(np.float64).mean(axis=1).astype(np.float16)
        return np.repeat(means.astype(np.float32), self.block_tokens, axis=0), 2 * means.size
