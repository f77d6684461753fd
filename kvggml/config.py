"""Typed configuration read from environment variables.

Every setting is declared once in SETTINGS (name, type, default, range, meaning);
parsing, the CLI's `kvggml info` and the README's table all come from it. A bad
value raises ConfigError naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvggml.presets import PRESETS_ALLOWED, is_preset, role_bits, widest_bits

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
    text: tuple[str, Callable[[str, str], object]] | None = None  # (what is allowed, parser(env, raw))

    def allowed(self) -> str:
        if self.text:
            return self.text[0]
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return f"an integer from {self.min} to {self.max}"

    def parse(self, raw: str) -> object:
        if self.text:
            return self.text[1](self.env, raw)
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


@dataclass(frozen=True)
class Step:
    """One step of the hierarchy: blocks at least `age` tokens old are coarsened to `bits` (A_L, D_L, ..., D_1)."""

    age: int
    bits: tuple[int, ...]


SCHEDULE_ALLOWED = "AGE:WIDTHS steps separated by commas, ages increasing, widths narrowing (e.g. 2048:6.4.3.3.0)"
BUDGET_ALLOWED = "bytes (512MiB, 2GiB, 1000000) or a fraction of the f16 cache above 0 and at most 1 (0.25)"
BUDGET_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 1000, "MB": 10**6, "GB": 10**9}


def parse_schedule_text(env: str, raw: str) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Syntax only; widths are checked against the level and preset in CompressionConfig.from_env."""
    steps = []
    for item in raw.split(","):
        match = re.fullmatch(r"\s*(\d+):([\d.]+)\s*", item)
        if not match or int(match.group(1)) > 1 << 24:
            raise ConfigError(
                f"{env}={raw!r} is not a schedule: expected AGE:WIDTHS steps separated by commas, "
                "AGE an integer from 0 to 16777216 (tokens), e.g. 2048:6.4.3.3.0,6144:6.4.3.0.0"
            )
        steps.append((int(match.group(1)), match.group(2)))
    return tuple(steps)


def parse_preset(env: str, raw: str) -> str:
    value = raw.strip()
    if not is_preset(value):
        raise ConfigError(f"{env}={raw!r} is not allowed: expected {PRESETS_ALLOWED}")
    return value


LAYERS_ALLOWED = "LAYERS=PRESET items separated by spaces, LAYERS model layer numbers (e.g. 5,11=hi 17=hi/lo)"


def parse_layers(env: str, raw: str) -> tuple[tuple[int, str], ...]:
    """(model layer, preset) pairs by layer; the messages are the library's (kvggml/csrc/config.cpp)."""
    presets: dict[int, str] = {}
    for item in raw.split() or [""]:
        layers, equals, preset = item.partition("=")
        numbers = layers.split(",")
        if not equals or not all(re.fullmatch(r"\d{1,5}", n) and int(n) <= 65535 for n in numbers):
            raise ConfigError(
                f"{env}={raw!r} item '{item}' is not LAYERS=PRESET: expected items separated by spaces, LAYERS "
                "model layer numbers from 0 to 65535 separated by commas (e.g. 5,11=hi 17=hi/lo)"
            )
        if not is_preset(preset):
            raise ConfigError(
                f"{env}={raw!r} item '{item}': preset '{preset}' is not allowed: expected {PRESETS_ALLOWED}"
            )
        for layer in map(int, numbers):
            if layer in presets:
                raise ConfigError(f"{env}={raw!r} names layer {layer} twice: each layer takes one preset")
            presets[layer] = preset
    return tuple(sorted(presets.items()))


def parse_budget(env: str, raw: str) -> tuple[int, float]:
    """(bytes, fraction of f16), one of them 0; the messages are the library's (kvggml/csrc/config.cpp)."""
    value = raw.strip()
    allowed = (
        " expected bytes (an integer, optionally with B, KiB, MiB, GiB, KB, MB or GB) or a "
        "fraction of the f16 cache above 0 and at most 1 (e.g. 0.25)"
    )
    if "." in value:
        try:
            fraction = float(value)
        except ValueError:
            fraction = 0.0
        if not 0 < fraction <= 1:
            raise ConfigError(f"{env}={raw!r} is out of range:{allowed}")
        return 0, fraction
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", value)
    if not match or match.group(2) not in BUDGET_UNITS or int(match.group(1)) == 0:
        raise ConfigError(f"{env}={raw!r} is not a size:{allowed}")
    return int(match.group(1)) * BUDGET_UNITS[match.group(2)], 0.0


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
        "bits per wavelet subband (see Presets): fine (6.7 bits/element), hi (5.2), balanced (3.5), lo (3.4); "
        "K/V gives keys and values presets of their own: hi/lo (4.3)",
        text=(PRESETS_ALLOWED, parse_preset),
    ),
    "layers": Setting(
        "OLLAMA_KV_COMPRESSION_LAYERS",
        "",
        "model layers whose K and V take a preset of their own instead of PRESET, e.g. 18=hi/balanced for a "
        "layer whose keys are far more sensitive than the others' (see Layers apart); full-attention layers only",
        text=(LAYERS_ALLOWED, parse_layers),
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
    "schedule": Setting(
        "OLLAMA_KV_COMPRESSION_SCHEDULE",
        "",
        "the hierarchy by age: blocks at least AGE tokens older than their sequence's newest token are "
        "coarsened to WIDTHS (A_L, D_L, ..., D_1; 0 drops a subband), one step after another",
        text=(SCHEDULE_ALLOWED, parse_schedule_text),
    ),
    "budget": Setting(
        "OLLAMA_KV_COMPRESSION_BUDGET",
        "",
        "cap on the context's KV memory (exact cells + blocks): when exceeded, the oldest blocks coarsen "
        "first, along the schedule's steps (or, without one, dropping detail subbands finest first); "
        "a context whose n_ctx cannot fit is refused",
        text=(BUDGET_ALLOWED, parse_budget),
    ),
    "guidance": Setting(
        "OLLAMA_KV_COMPRESSION_GUIDANCE",
        0,
        "1: under the budget each KV head of each layer coarsens on its own, oldest first, and a head "
        "ages faster the less it attends to old blocks (attention sampled from one query in 64); the "
        "schedule's steps may then only drop subbands (README, The hierarchy)",
        min=0,
        max=1,
    ),
    "direct": Setting(
        "OLLAMA_KV_COMPRESSION_DIRECT",
        1,
        "1: attention of micro-batches up to 32 tokens reads the blocks' quantized coefficients directly "
        "(scores and outputs through the Haar transform); 0: every block is decoded to f16 first, the "
        "reference path",
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
    layers: tuple[tuple[int, str], ...] = ()  # (model layer, its preset), by layer
    sinks: int = 4
    hadamard: bool = True
    schedule: tuple[Step, ...] = ()
    budget: tuple[int, float] = (0, 0.0)  # (bytes, fraction of the f16 cache); (0, 0.0): none
    guidance: bool = False
    direct: bool = True

    @property
    def block_tokens(self) -> int:
        return 1 << self.level

    def ladder(self) -> tuple[Step, ...]:
        """The steps a block walks (the library's Config::ladder): the schedule, or with a budget and
        none, the detail subbands dropped finest first (D_1, ..., D_{L-1}) at no age (the budget's alone)."""
        if self.schedule or self.budget == (0, 0.0):
            return self.schedule
        bits, steps = list(self.widest_bits()), []
        for k in range(self.level, 1, -1):
            bits[k] = 0
            steps.append(Step(0xFFFFFFFF, tuple(bits)))
        return tuple(steps)

    def preset_of(self, layer: int | None) -> str:
        """Model layer `layer`'s preset: its own, or the preset (layer None: the preset)."""
        return dict(self.layers).get(layer, self.preset)

    def widest_bits(self) -> tuple[int, ...]:
        """Per subband the widest of K's and V's widths, over the preset and every layer's."""
        return widest_bits(presets_in_use(self.preset, self.layers), self.level)

    def codec(self, role: str, layer: int | None = None) -> HaarCodec:
        """The codec the library applies with these settings to K (role "k") or V ("v") of model layer
        `layer` (None: a layer without a preset of its own)."""
        from kvggml.codecs import HaarCodec  # numpy: only when asked, so reading settings stays light

        bits = role_bits(self.preset_of(layer), self.level)[role == "v"]
        return HaarCodec(levels=self.level, bits=bits, hadamard=self.hadamard)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CompressionConfig:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            setting = SETTINGS[f.name]
            raw = environ.get(setting.env)
            value = setting.default if raw is None or raw == "" else setting.parse(raw)
            values[f.name] = bool(value) if f.type in ("bool", bool) else value
        values["schedule"] = schedule_steps(environ.get(SETTINGS["schedule"].env, ""), values)
        values["budget"] = values["budget"] or (0, 0.0)
        values["layers"] = values["layers"] or ()
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        env = {
            SETTINGS[name].env: str(int(v) if isinstance(v, bool) else v)
            for name in ("enabled", "threshold", "level", "preset", "sinks", "hadamard")
            for v in [getattr(self, name)]
        }
        env[SETTINGS["layers"].env] = " ".join(f"{layer}={preset}" for layer, preset in self.layers)
        env[SETTINGS["schedule"].env] = ",".join(f"{s.age}:{'.'.join(map(str, s.bits))}" for s in self.schedule)
        bytes_, fraction = self.budget
        env[SETTINGS["budget"].env] = str(fraction) if fraction else str(bytes_) if bytes_ else ""
        return env


def presets_in_use(preset: str, layers: tuple[tuple[int, str], ...]) -> list[str]:
    """The preset and the layers' own: together they give the widths a schedule starts from."""
    return [preset, *(layer_preset for _, layer_preset in layers)]


def schedule_steps(raw: str, values: dict) -> tuple[Step, ...]:
    """The parsed schedule checked against the level and preset, with the library's messages."""
    env = SETTINGS["schedule"].env
    what = f"{env}={raw!r}"
    presets = presets_in_use(values["preset"], values["layers"] or ())
    before, steps = widest_bits(presets, values["level"]), []
    first = f"preset {values['preset']}'s" + ("" if len(presets) == 1 else " and the layers', widest")
    for age, widths in values["schedule"] or ():
        item = f"{age}:{widths}"
        parts = widths.split(".")
        if len(parts) != values["level"] + 1 or any(not p or int(p) == 1 or int(p) > 16 for p in parts):
            raise ConfigError(
                f"{what} step '{item}': expected {values['level'] + 1} dot-separated widths "
                "(A_L, D_L, ..., D_1), each 0 or 2 to 16"
            )
        bits = tuple(map(int, parts))
        widened = [k for k, (b, a) in enumerate(zip(bits, before, strict=True)) if b > a]
        if widened:
            raise ConfigError(
                f"{what} step '{item}' widens subband {widened[0]}: each step's widths must be at most the step "
                f"before's (the first: {first})"
            )
        if bits == tuple(before) or (steps and age <= steps[-1].age):
            raise ConfigError(
                f"{what} step '{item}' must be older and narrower than the step before: ages increasing, "
                "widths narrower in at least one subband"
            )
        narrowed = [k for k, (b, a) in enumerate(zip(bits, before, strict=True)) if b not in (0, a)]
        if values["guidance"] and narrowed:
            k = narrowed[0]
            raise ConfigError(
                f"{what} step '{item}' narrows subband {k} from {before[k]} to {bits[k]} bits: with "
                "OLLAMA_KV_COMPRESSION_GUIDANCE=1 each KV head steps on its own, so a step may only drop "
                f"subbands: 0 or {before[k]}"
            )
        steps.append(Step(age, bits))
        before = bits
    return tuple(steps)


def markdown_table() -> str:
    """The README's table of variables."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS.values():
        default = f"`{setting.default}`" if setting.default != "" else "unset"
        rows.append(f"| `{setting.env}` | {default} | {setting.allowed()} | {setting.help} |")
    return "\n".join(rows)
