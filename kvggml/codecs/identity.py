"""The uncompressed baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_layer, check_role


@dataclass(frozen=True)
class Identity(Codec):
    name: str = field(default="f16", compare=False)
    KIND: ClassVar[str] = "f16"

    @property
    def description(self) -> str:
        return "uncompressed f16 values (the values are already f16, so the round trip is exact)"

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_layer(x, 1)
        check_role(role)
        return x.copy(), 2 * x.size
