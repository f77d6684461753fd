"""Keys and values through codecs of their own: keys are the sensitive half (README, "Presets")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec, check_role


@dataclass(frozen=True)
class KeysValues(Codec):
    """`keys` on K, `values` on V; spec "K|V", each side a codec spec: "haar-hi|haar-lo"."""

    keys: Codec
    values: Codec
    name: str = field(default="", compare=False)
    KIND: ClassVar[str] = "k|v"

    def __post_init__(self) -> None:
        if self.keys.evicts or self.values.evicts:
            raise ValueError(f"{self.keys.name}|{self.values.name}: neither K's codec nor V's may evict")
        if not self.name:
            object.__setattr__(self, "name", f"{self.keys.name}|{self.values.name}")

    @property
    def block_tokens(self) -> int:
        """K and V compress the same tokens: whole blocks of both codecs."""
        return math.lcm(self.keys.block_tokens, self.values.block_tokens)

    @property
    def description(self) -> str:
        return f"K: {self.keys.description}; V: {self.values.description}"

    def spec(self) -> str:
        return f"{self.keys.spec()}|{self.values.spec()}"

    @property
    def layers_named(self) -> frozenset[int]:
        return self.keys.layers_named | self.values.layers_named

    def for_layer(self, layer: int) -> Codec:
        return KeysValues(self.keys.for_layer(layer), self.values.for_layer(layer))

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        check_role(role)
        return (self.keys if role == "k" else self.values).roundtrip(x, role)
