"""What every codec shares: the `Codec` interface, spec-parameter parsing and input checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np


class Codec:
    """What the evaluator uses: a named configuration with a round trip through the compressed form.

    A subclass is a frozen dataclass that sets KIND (the spec's prefix), lists its spec fields in
    SPEC_FIELDS (field -> parser of the text after `=`) and implements `description` and `roundtrip`.
    """

    name: str  # short registry name, or the canonical spec
    evicts: bool = False  # True only for Eviction: the evaluator removes the tokens instead
    KIND: ClassVar[str]
    SPEC_FIELDS: ClassVar[dict[str, Callable[[str], object]]] = {}

    @property
    def block_tokens(self) -> int:
        """n_tokens passed to roundtrip is always a multiple of this."""
        return 1

    @property
    def description(self) -> str:
        raise NotImplementedError

    def roundtrip(self, x: np.ndarray, role: str) -> tuple[np.ndarray, int]:
        """x: float32 (n_tokens, n_heads, head_dim), one layer's K (role 'k') or V (role 'v').

        Returns the decoded float32 array of the same shape and the exact serialized size in bytes.
        """
        raise NotImplementedError

    def for_layer(self, layer: int) -> Codec:
        """The codec model layer `layer` goes through: this one, unless it sets layers apart."""
        return self

    @property
    def layers_named(self) -> frozenset[int]:
        """The model layers this codec sets apart (none unless it is per layer)."""
        return frozenset()

    def spec(self) -> str:
        """Canonical spec string; parse_codec(spec) gives an equal codec."""
        params = ",".join(f"{key}={format_param(getattr(self, key))}" for key in self.SPEC_FIELDS)
        return f"{self.KIND}:{params}" if params else self.KIND

    def bits_per_element(self, n_heads: int = 4, head_dim: int = 64) -> float:
        """Compressed bits per value, measured on a seeded random-normal layer of that shape."""
        n_tokens = self.block_tokens * max(1, 64 // self.block_tokens)
        x = np.random.default_rng(0).standard_normal((n_tokens, n_heads, head_dim)).astype(np.float16)
        _, size = self.roundtrip(x.astype(np.float32), "k")
        return 8 * size / x.size

    def _set_default_name(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.spec())


def format_param(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return ".".join(map(str, value))
    return repr(value)


def parse_flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return raw == "1"


def parse_dotted(raw: str) -> tuple[int, ...]:
    return tuple(int(part, 10) for part in raw.split("."))


def parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def require(ok: bool, kind: str, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{kind}: {key}={format_param(value)} is out of range: allowed {allowed}")


def check_layer(x: np.ndarray, block_tokens: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3:
        raise ValueError(
            "expected a float32 array of shape (n_tokens, n_heads, head_dim), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if x.shape[0] % block_tokens:
        raise ValueError(f"n_tokens={x.shape[0]} is not a multiple of the codec's block of {block_tokens} tokens")
    if not np.isfinite(x).all():
        raise ValueError("input holds non-finite values")


def check_role(role: str) -> None:
    if role not in ("k", "v"):
        raise ValueError(f"role must be 'k' or 'v', got {role!r}")
