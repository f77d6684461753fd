"""Model layers through codecs of their own: sensitivity differs from layer to layer (README,
"Layers apart"), so an allocation can spend bits where they buy the most."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvggml.codecs.base import Codec


@dataclass(frozen=True)
class PerLayer(Codec):
    """`base` on every model layer but those an override names; spec "BASE@LAYERS=CODEC@...", layers
    by their number in the model: "haar-lo@5,11=haar-hi". Keys and values apart wrap it: a spec is
    split at "|" first, so "haar-lo@5,11=haar-hi|haar-lo" sets layers apart in K only."""

    base: Codec
    overrides: tuple[tuple[tuple[int, ...], Codec], ...]
    name: str = field(default="", compare=False)
    KIND: ClassVar[str] = "@"

    def __post_init__(self) -> None:
        codecs = [self.base, *(codec for _, codec in self.overrides)]
        if any(c.evicts or isinstance(c, PerLayer) for c in codecs):
            raise ValueError(f"{self.spec()}: a layer's codec may not evict, nor set layers apart itself")
        named = [layer for layers, _ in self.overrides for layer in layers]
        if len(named) != len(set(named)):
            raise ValueError(f"{self.spec()}: a layer is named twice")
        if not self.name:
            object.__setattr__(self, "name", self.spec())

    @property
    def block_tokens(self) -> int:
        """Every layer compresses the same tokens: whole blocks of each of the codecs."""
        return math.lcm(self.base.block_tokens, *(codec.block_tokens for _, codec in self.overrides))

    @property
    def description(self) -> str:
        named = "; ".join(f"layers {','.join(map(str, layers))}: {c.description}" for layers, c in self.overrides)
        return f"{named}; other layers: {self.base.description}"

    def spec(self) -> str:
        named = "".join(f"@{','.join(map(str, layers))}={codec.spec()}" for layers, codec in self.overrides)
        return f"{self.base.spec()}{named}"

    @property
    def layers_named(self) -> frozenset[int]:
        return frozenset(layer for layers, _ in self.overrides for layer in layers)

    def for_layer(self, layer: int) -> Codec:
        return next((codec for layers, codec in self.overrides if layer in layers), self.base)

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        raise ValueError(f"{self.spec()} sets model layers apart: take one layer's codec with for_layer(layer)")
