"""Typed configuration read from environment variables.

Every setting is declared once in SETTINGS (name, type, default, range, meaning);
parsing, the CLI's `kvggml info` and the README's table all come from it. A bad
value raises ConfigError naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvggml.presets import PRESETS, preset_bits

if TYPE_CHECKING:
    from kvggml.codecs import HaarCodec


class ConfigError(ValueError):
    """An environment variable holds a value outside its allowed range."""


@dataclass(frozen=True)
class Setting:
    env: str
    default: object
    help: str
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return f"an integer from {self.min} to {self.max}"

    def parse(self, raw: str) -> object:
        value = raw.strip()
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{self.env}={raw!r} is not allowed: expected {self.allowed()}")
            return value
        try:
            number = int(value, 10)
        except ValueError:
            raise ConfigError(f"{self.env}={raw!r} is not an integer: expected {self.allowed()}") from None
        if not (self.min <= number <= self.max):
            raise ConfigError(f"{self.env}={raw!r} is out of range: expected {self.allowed()}")
        return number


# Field name -> setting; the dataclass below has one field per entry, in this order.
SETTINGS: dict[str, Setting] = {
    "enabled": Setting(
        "OLLAMA_KV_COMPRESSION",
        0,
        "1 turns KV-cache compression on, 0 leaves the cache as stock llama.cpp's",
        min=0,
        max=1,
    ),
    "threshold": Setting(
        "OLLAMA_KV_COMPRESSION_THRESHOLD",
        512,
        "most recent tokens of each sequence kept exact (f16); older ones are compressed",
        min=0,
        max=1 << 24,
    ),
    "level": Setting(
        "OLLAMA_KV_COMPRESSION_LEVEL", 4, "Haar levels along the token axis; a block holds 2^LEVEL tokens", min=1, max=6
    ),
    "preset": Setting(
        "OLLAMA_KV_COMPRESSION_PRESET",
        "balanced",
        "bits per wavelet subband (see Presets): hi (5.2 bits/element), balanced (3.5), lo (3.4)",
        choices=tuple(PRESETS),
    ),
    "sinks": Setting(
        "OLLAMA_KV_COMPRESSION_SINKS", 4, "first tokens of each sequence kept exact (attention sinks)", min=0, max=4096
    ),
    "hadamard": Setting(
        "OLLAMA_KV_COMPRESSION_HADAMARD",
        1,
        "1 rotates each head with a Hadamard transform before the wavelet (spreads outlier channels)",
        min=0,
        max=1,
    ),
}


@dataclass(frozen=True)
class CompressionConfig:
    enabled: bool = False
    threshold: int = 512
    level: int = 4
    preset: str = "balanced"
    sinks: int = 4
    hadamard: bool = True

    @property
    def block_tokens(self) -> int:
        return 1 << self.level

    def codec(self) -> HaarCodec:
        """The codec the library applies with these settings."""
        from kvggml.codecs import HaarCodec  # numpy: only when asked, so reading settings stays light

        return HaarCodec(levels=self.level, bits=preset_bits(self.preset, self.level), hadamard=self.hadamard)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CompressionConfig:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            setting = SETTINGS[f.name]
            raw = environ.get(setting.env)
            value = setting.default if raw is None or raw == "" else setting.parse(raw)
            values[f.name] = bool(value) if f.type in ("bool", bool) else value
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {
            SETTINGS[f.name].env: str(int(v) if isinstance(v, bool) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }


def markdown_table() -> str:
    """The README's table of variables."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS.values():
        rows.append(f"| `{setting.env}` | `{setting.default}` | {setting.allowed()} | {setting.help} |")
    return "\n".join(rows)
