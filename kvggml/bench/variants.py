"""The caches a bench compares: stock llama.cpp's cache types and kvggml's presets, with hierarchy settings.

A variant is a name of VARIANTS (or "kvggml K/V": a preset for keys and one for values),
optionally followed by settings of the hierarchy, each
`;NAME=VALUE` for OLLAMA_KV_COMPRESSION_NAME: "kvggml balanced;SCHEDULE=4096:6.4.3.3.0;BUDGET=0.25".
Each one runs in processes of its own, on the stock or the patched build of the same pinned llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvggml.config import SETTINGS, CompressionConfig
from kvggml.library import library_dir
from kvggml.presets import KEYS_VALUES_PRESETS, PRESETS, is_preset

# name -> (library, cache type, compression preset or None)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "stock f16": ("stock", "f16", None),
    "stock q8_0": ("stock", "q8_0", None),
    "stock q4_0": ("stock", "q4_0", None),
    **{f"kvggml {p}": ("patched", "f16", p) for p in PRESETS},
}
GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
REFERENCE = "stock f16"  # KLD is measured against it; every bench measures it first
# Every stock cache type and preset, K/V presets, and one budget of the hierarchy in age order and
# guided (README, "The hierarchy"): the same bytes, so the frontier shows what guidance buys.
DEFAULT_VARIANTS = [
    *VARIANTS,
    *(f"kvggml {p}" for p in KEYS_VALUES_PRESETS),
    "kvggml balanced;BUDGET=0.25",
    "kvggml balanced;BUDGET=0.25;GUIDANCE=1",
]
QUICK_VARIANTS = ["stock f16", "stock q4_0", "kvggml balanced"]
PREFIX = "OLLAMA_KV_COMPRESSION"


@dataclass(frozen=True)
class Variant:
    label: str
    library: str  # "stock" or "patched"
    cache_type: str  # f16, q8_0 or q4_0
    preset: str | None
    settings: dict[str, str]  # OLLAMA_KV_COMPRESSION_* variables beyond the preset

    @classmethod
    def parse(cls, label: str) -> Variant:
        """A variant, or ValueError naming it and what is allowed (before anything is measured)."""
        name, *settings = label.split(";")
        if name in VARIANTS:
            library, cache_type, preset = VARIANTS[name]
        elif name.startswith("kvggml ") and is_preset(kv_preset := name.removeprefix("kvggml ")):  # or "kvggml hi/lo"
            library, cache_type, preset = "patched", "f16", kv_preset
        else:
            raise ValueError(
                f"variant {label!r}: unknown {name!r}: expected one of {', '.join(VARIANTS)}, or kvggml K/V "
                "with a preset for each (kvggml hi/lo), optionally followed by ;NAME=VALUE settings"
            )
        variables = {}
        known = {s.env.removeprefix(f"{PREFIX}_") for s in SETTINGS.values()} - {PREFIX, "PRESET"}
        for setting in settings:
            key, equals, value = setting.partition("=")
            if not equals or key not in known:
                raise ValueError(f"variant {label!r}: {setting!r} is not NAME=VALUE with NAME one of {sorted(known)}")
            variables[f"{PREFIX}_{key}"] = value
        if variables and not preset:
            raise ValueError(f"variant {label!r}: settings apply to kvggml variants only")
        variant = cls(label, library, cache_type, preset, variables)
        if preset:
            CompressionConfig.from_env(variant.compression_env())  # a bad value names its variable here
        return variant

    def compression_env(self) -> dict[str, str]:
        if not self.preset:
            return {PREFIX: "0"}
        return {PREFIX: "1", f"{PREFIX}_PRESET": self.preset, **self.settings}

    def env(self) -> dict[str, str]:
        """This process's environment with the variant's library and compression settings alone: the
        shell's OLLAMA_KV_COMPRESSION* and library path would otherwise leak into every variant. The
        build's own folder comes first on the loader's path: its programs and libllama name the folder
        they were built in, which is another build when KVGGML_BUILD_DIR points at a copy."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        env.pop("LLAMA_CPP_LIB_PATH", None)
        loader_path = os.pathsep.join(filter(None, [str(library_dir(self.library)), env.get("LD_LIBRARY_PATH")]))
        return {**env, "LD_LIBRARY_PATH": loader_path, "KVGGML_LIB": self.library, **self.compression_env()}

    def tool(self, name: str) -> Path:
        """A llama.cpp program of the variant's build."""
        return library_dir(self.library) / name

    def cache_flags(self, flash_attn: bool = True) -> list[str]:
        # Quantized V needs flash attention; it is on unless a speed cell asks otherwise, so every
        # variant runs the same kernel.
        return ["-ctk", self.cache_type, "-ctv", self.cache_type, "-fa", "on" if flash_attn else "off"]

    @property
    def ggml_type(self) -> int:
        return GGML_TYPES[self.cache_type]
