"""Stock llama.cpp's block quantizers Q8_0 and Q4_0, bit for bit with ggml's reference (quantize_row_*_ref)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role, parse_flag
from kvggml.codecs.hadamard import hadamard_rotate


@dataclass(frozen=True)
class _GgmlBlockQuant(Codec):
    """ggml's reference quantizer on blocks of 32 consecutive values of each token's row."""

    hadamard: bool = False
    name: str = field(default="", compare=False)
    BLOCK_BYTES: ClassVar[int]
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {"hadamard": parse_flag}

    def __post_init__(self) -> None:
        self._set_default_name()

    @property
    def description(self) -> str:
        rotation = ", after a Hadamard rotation of each head as llama.cpp does" if self.hadamard else ""
        return f"ggml {self.KIND} ({self.BLOCK_BYTES * 8 / 32:g} bits/element, quantize_row_{self.KIND}_ref){rotation}"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_layer(x, 1)
        check_role(role)
        head_dim = x.shape[2]
        if head_dim % 32:
            raise ValueError(f"{self.KIND} needs head_dim divisible by 32, got {head_dim}")
        y = hadamard_rotate(x, head_dim) if self.hadamard else x
        decoded = self._quant_dequant(y.reshape(-1, 32)).reshape(x.shape)
        if self.hadamard:
            decoded = hadamard_rotate(decoded, head_dim)
        return decoded, x.size // 32 * self.BLOCK_BYTES

    def _quant_dequant(self, rows: np.ndarray) -> np.ndarray:
        """float32 (n_blocks, 32) -> the same values quantized and dequantized."""
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
