"""The named presets: bits per wavelet subband (no numpy, so configuration stays light to import)."""

from __future__ import annotations

from collections.abc import Iterable

# Subband widths of the named presets: A_L, then details D_1 (finest), D_2, D_3, D_4 and coarser.
# Chosen with `kvggml eval` on SmolLM2 (README, "Presets"); the library reads the same table
# (kvggml/csrc/config.cpp) for OLLAMA_KV_COMPRESSION_PRESET.
# "fine" (6.7 bits/element) was added for a cache at stock q8_0's quality in less memory
# (README, "The hierarchy").
PRESETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "fine": (8, (6, 6, 7, 8)),
    "hi": (8, (4, 5, 6, 7)),
    "balanced": (6, (3, 3, 3, 4)),
    "lo": (4, (3, 3, 3, 3)),
}


# A preset for K and one for V, between balanced and hi in bits and in KLD, below the line between them
# (README, "Keys and values apart"): kvggml info and kvggml bench show it beside the presets.
KEYS_VALUES_PRESETS = ("hi/lo",)

# What OLLAMA_KV_COMPRESSION_PRESET allows: a preset, or K's and V's (keys are the sensitive half).
PRESETS_ALLOWED = f"one of {', '.join(PRESETS)}, or two of them as K/V, K's preset then V's (e.g. hi/lo)"


def split_preset(preset: str) -> tuple[str, str]:
    """K's and V's preset: "hi/lo" -> ("hi", "lo"), "hi" -> ("hi", "hi")."""
    k, slash, v = preset.partition("/")
    return (k, v) if slash else (preset, preset)


def is_preset(preset: str) -> bool:
    return all(name in PRESETS for name in split_preset(preset))


def role_bits(preset: str, levels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Widths of K's and of V's preset (a preset or K/V)."""
    k, v = split_preset(preset)
    return preset_bits(k, levels), preset_bits(v, levels)


def widest_bits(presets: Iterable[str], levels: int) -> tuple[int, ...]:
    """Per subband the widest of K's and V's widths over `presets` (the preset and the layers' own):
    where a schedule and the budget's ladder start."""
    return tuple(map(max, *(bits for preset in presets for bits in role_bits(preset, levels))))


def preset_bits(preset: str, levels: int) -> tuple[int, ...]:
    """Widths [A_L, D_L, ..., D_1] of a preset at `levels` levels."""
    approximation, detail = PRESETS[preset]
    return (approximation, *(detail[min(j, 4) - 1] for j in range(levels, 0, -1)))
