"""The baseline that drops old tokens instead of compressing them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role


@dataclass(frozen=True)
class Eviction(Codec):
    name: str = field(default="evict", compare=False)
    KIND: ClassVar[str] = "evict"
    evicts = True

    @property
    def description(self) -> str:
        return "old tokens are removed from the cache (roundtrip alone returns zeros)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_layer(x, 1)
        check_role(role)
        return np.zeros_like(x), 0
