#!/usr/bin/env python3
"""Write the golden vectors of the wavelet block codec into tests/vectors/ (format: tests/vectors/README.md).

Valid cases: <case>.in.bin (f16 input), <case>.bin (encoded block), <case>.out.bin (decoded f32),
listed with their configuration in manifest.txt. Coarsened blocks (FORMAT.md section 10):
coarsen/<case>.bin, listed in coarsen/manifest.txt with the case they come from, the channels
that change (section 11) and their widths. Malformed blocks: invalid/<defect>.bin, listed in
invalid/manifest.txt with a word the reference's error message contains.
Deterministic: rerunning rewrites identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvggml.codecs import CODECS, HaarCodec, coarsen_block, decode_block

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors"
TOKENS, CHANNELS, HEAD_DIM = 16, 64, 32  # most cases: a 16-token block of 2 heads x 32


def f16(values: np.ndarray) -> np.ndarray:
    """float32 array of f16-representable values (saturating like a cache write would overflow)."""
    return np.clip(values, -65504, 65504).astype(np.float16).astype(np.float32)


def smooth(rng: np.random.Generator, tokens: int = TOKENS, channels: int = CHANNELS) -> np.ndarray:
    """Slowly varying channels plus a little noise: what the Haar transform is for."""
    t = np.arange(tokens)[:, None]
    phase, freq, level = rng.uniform(0, 6.3, channels), rng.uniform(0.02, 0.2, channels), rng.normal(0, 2, channels)
    return f16(level + np.sin(freq * t + phase) + 0.05 * rng.standard_normal((tokens, channels)))


def valid_cases() -> list[tuple[str, str, HaarCodec, int, np.ndarray]]:
    """(name, description, codec, head_dim, block)."""
    rng = np.random.default_rng(20240601)
    normal = f16(rng.standard_normal((TOKENS, CHANNELS)))
    outlier = normal.copy()
    outlier[:, 5] = f16(300 + 40 * rng.standard_normal(TOKENS))
    signs = rng.choice([-1.0, 1.0], (TOKENS, CHANNELS)).astype(np.float32)
    ramp = f16(np.arange(TOKENS)[:, None] * rng.uniform(-0.5, 0.5, CHANNELS) + rng.normal(0, 3, CHANNELS))
    haar = CODECS["haar"]
    cases = [
        ("normal", "standard normal values, default preset", haar, HEAD_DIM, normal),
        ("outlier_channel", "normal values with one channel near 300", haar, HEAD_DIM, outlier),
        ("zeros", "all zeros: every group absent", haar, HEAD_DIM, np.zeros((TOKENS, CHANNELS), np.float32)),
        (
            "constant",
            "one value everywhere: details all zero, absent",
            haar,
            HEAD_DIM,
            np.full((TOKENS, CHANNELS), 1.5, np.float32),
        ),
        ("ramp", "linear ramp in time per channel", haar, HEAD_DIM, ramp),
        ("f16_max", "+-65504 everywhere: scales saturate at 65504", haar, HEAD_DIM, 65504 * signs),
        (
            "f16_subnormal",
            "f16 subnormals: subnormal scales",
            haar,
            HEAD_DIM,
            f16(signs * rng.uniform(0, 6e-5, signs.shape)),
        ),
        (
            "smooth_threshold",
            "smooth channels, detail groups dropped below 0.5 x A_L level",
            HaarCodec(group=8, threshold=0.5),
            HEAD_DIM,
            smooth(rng),
        ),
        (
            "levels1_group8",
            "one level, 8-channel groups, no rotation",
            HaarCodec(levels=1, bits=(6, 3), hadamard=False, group=8),
            HEAD_DIM,
            normal[:2],
        ),
        (
            "levels0",
            "no transform: plain 5-bit group quantization of one token",
            HaarCodec(levels=0, bits=(5,), hadamard=False, group=16),
            HEAD_DIM,
            normal[:1],
        ),
        (
            "dropped_subbands",
            "3 levels, D_3 and D_1 dropped, 16-channel rotation",
            HaarCodec(levels=3, bits=(8, 0, 4, 0), group=16),
            16,
            smooth(rng, 8),
        ),
        (
            "odd_sizes",
            "3 channels of 3 per group, 2- and 3-bit values: bitmap and value padding",
            HaarCodec(levels=1, bits=(2, 3), hadamard=False, group=3),
            3,
            smooth(rng, 2, 3),
        ),
        ("heads64", "default preset on 2 heads x 64", haar, 64, f16(rng.standard_normal((TOKENS, 128)))),
    ]
    for preset in ("haar-hi", "haar-lo", "haar-noH", "haar-16"):
        cases.append((f"preset_{preset}", f"preset {preset} on normal values", CODECS[preset], HEAD_DIM, normal))
    return cases


# (case, source case, new widths, description)
COARSEN_CASES = [
    ("unchanged", "normal", (6, 4, 3, 3, 3), "the same widths: the same bytes"),
    ("drop_finest", "normal", (6, 4, 3, 3, 0), "D_1 dropped"),
    ("narrow_finest", "normal", (6, 4, 3, 2, 2), "D_2 and D_1 narrowed to 2 bits"),
    ("approximation_only", "normal", (6, 0, 0, 0, 0), "every detail dropped"),
    ("narrow_approximation", "normal", (4, 3, 3, 3, 3), "A_L and D_L narrowed"),
    ("hi_ladder", "preset_haar-hi", (8, 7, 6, 5, 2), "hi preset, D_1 from 4 to 2 bits"),
    ("saturated", "f16_max", (6, 4, 3, 2, 0), "scales at 65504, narrowed and dropped"),
    ("subnormal", "f16_subnormal", (3, 2, 2, 2, 2), "subnormal scales quantized again"),
    ("absent_groups", "smooth_threshold", (6, 2, 2, 2, 2), "absent detail groups stay absent"),
    ("already_dropped", "dropped_subbands", (8, 0, 2, 0), "subbands dropped at encoding stay dropped"),
    ("padding", "odd_sizes", (2, 2), "3-channel groups: bitmap and value padding"),
    ("zeros", "zeros", (6, 4, 3, 3, 0), "every group absent"),
    ("head_drop_finest", "heads64", (6, 4, 3, 3, 0), "D_1 dropped from the second head only (section 11)", (64, 128)),
    ("head_drop_two", "heads64", (6, 4, 3, 0, 0), "D_2 and D_1 dropped from the first head only", (0, 64)),
    ("groups_drop", "smooth_threshold", (6, 4, 3, 0, 3), "D_2 dropped from 3 groups of 8 channels", (16, 40)),
    ("head_drop_last", "head_drop_finest", (6, 4, 3, 3, 0), "D_1 dropped from the other head: width 0", (0, 64)),
]


def invalid_cases() -> list[tuple[str, bytes, str]]:
    """(defect, bytes, word of the error message), each one defect away from a valid block."""
    rng = np.random.default_rng(7)
    small = HaarCodec(levels=2, bits=(8, 6, 4), hadamard=False, group=8)
    block = small.encode_block(f16(rng.standard_normal((4, 64))), 64)  # M = 32 bits, 32 scales
    scales_at = 11 + 4
    odd = HaarCodec(levels=1, bits=(2, 3), hadamard=False, group=3)
    tiny = odd.encode_block(np.array([[1.0, -0.5, 0.25], [0.5, 0.0, -1.0]], np.float32), 3)
    data_at = 10 + 1 + 2 * 2  # header, 1 bitmap byte (2 bits used), 2 scales

    def patch(data: bytes, offset: int, new: bytes) -> bytes:
        return data[:offset] + new + data[offset + len(new) :]

    def with_value(data: bytes, first_bits: int) -> bytes:
        """tiny with the first 2-bit value replaced."""
        byte = data[data_at] & ~0b11 | first_bits
        return patch(data, data_at, bytes([byte]))

    return [
        ("empty", b"", "truncated header"),
        ("truncated_header", block[:10], "truncated header"),
        ("bad_magic", patch(block, 0, b"X"), "magic"),
        ("bad_version", patch(block, 1, b"\x02"), "version"),
        ("levels_out_of_range", patch(block, 2, b"\x09"), "levels"),
        ("channels_zero", patch(block, 4, b"\x00\x00"), "inconsistent sizes"),
        ("group_zero", patch(block, 6, b"\x00\x00"), "inconsistent sizes"),
        ("group_not_dividing", patch(block, 6, b"\x07\x00"), "inconsistent sizes"),
        ("hadamard_not_dividing", patch(block, 3, b"\x07"), "inconsistent sizes"),
        ("bits_one", patch(block, 9, b"\x01"), "bits out of range"),
        ("bits_17", patch(block, 9, b"\x11"), "bits out of range"),
        ("truncated_bitmap", block[:13], "truncated presence bitmap"),
        ("truncated_scales", block[: scales_at + 5], "truncated scales"),
        ("truncated_data", block[:-1], "truncated data"),
        ("trailing_byte", block + b"\x00", "trailing bytes"),
        ("bitmap_padding", patch(tiny, 10, bytes([tiny[10] | 0x80])), "padding"),
        ("data_padding", tiny[:-1] + bytes([tiny[-1] | 0x80]), "padding"),
        ("scale_inf", patch(block, scales_at, b"\x00\x7c"), "non-finite scale"),
        ("scale_nan", patch(block, scales_at, b"\x00\x7e"), "non-finite scale"),
        ("scale_zero", patch(block, scales_at, b"\x00\x00"), "non-positive scale"),
        ("scale_negative", patch(block, scales_at, b"\x00\xbc"), "non-positive scale"),
        ("value_out_of_range", with_value(tiny, 0b10), "out of range"),
    ]


def main() -> None:
    (VECTORS / "invalid").mkdir(parents=True, exist_ok=True)
    manifest = ["# case L G R C threshold bits[0..L]  (R: Hadamard length, 1 = none; threshold: C99 hex float)"]
    for name, description, codec, head_dim, block in valid_cases():
        encoded = codec.encode_block(block, head_dim)
        rotation = head_dim if codec.hadamard else 1
        (VECTORS / f"{name}.in.bin").write_bytes(block.astype("<f2").tobytes())
        (VECTORS / f"{name}.bin").write_bytes(encoded)
        (VECTORS / f"{name}.out.bin").write_bytes(decode_block(encoded).astype("<f4").tobytes())
        threshold = float(np.float32(codec.threshold)).hex()
        manifest += [
            f"# {name}: {description}",
            " ".join(map(str, [name, codec.levels, codec.group, rotation, block.shape[1], threshold, *codec.bits])),
        ]
    (VECTORS / "manifest.txt").write_text("\n".join(manifest) + "\n")

    (VECTORS / "coarsen").mkdir(exist_ok=True)
    coarsened = ["# case source-case channels(c0:c1) bits'[0..L]"]
    for name, source, bits, description, *channels in COARSEN_CASES:
        source_bin = VECTORS / f"{source}.bin"
        if not source_bin.exists():  # a coarsened case as the source
            source_bin = VECTORS / "coarsen" / f"{source}.bin"
        block = source_bin.read_bytes()
        c0, c1 = channels[0] if channels else (0, int.from_bytes(block[4:6], "little"))
        (VECTORS / "coarsen" / f"{name}.bin").write_bytes(coarsen_block(block, bits, (c0, c1)))
        coarsened += [f"# {name}: {description}", " ".join(map(str, [name, source, f"{c0}:{c1}", *bits]))]
    (VECTORS / "coarsen" / "manifest.txt").write_text("\n".join(coarsened) + "\n")

    invalid = ["# file expected-word-of-the-error"]
    for defect, data, word in invalid_cases():
        (VECTORS / "invalid" / f"{defect}.bin").write_bytes(data)
        invalid.append(f"{defect}.bin\t{word}")
    (VECTORS / "invalid" / "manifest.txt").write_text("\n".join(invalid) + "\n")


if __name__ == "__main__":
    main()
