"""KIVI-style asymmetric quantization (Liu et al., 2024): K per channel, V per token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role, require


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
        require(2 <= self.bits <= 8, self.KIND, "bits", self.bits, "2 to 8")
        require(1 <= self.group <= 4096, self.KIND, "group", self.group, "1 to 4096")
        self._set_default_name()

    @property
    def block_tokens(self) -> int:
        return self.group

    @property
    def description(self) -> str:
        return (
            f"KIVI-style {self.bits}-bit asymmetric quantization, K per channel over {self.group} tokens, "
            f"V per token over {self.group} channels, f16 min and step per group"
        )

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_layer(x, self.block_tokens)
        check_role(role)
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
