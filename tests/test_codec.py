"""The codecs (kvggml/codecs/): golden vectors, the block format's validation, and the evaluator's interface."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kvggml.codecs import (
    CODECS,
    Q4_0,
    Q8_0,
    HaarCodec,
    Kivi,
    Pooling,
    coarsen_block,
    decode_block,
    hadamard_rotate,
    parse_codec,
)

pytestmark = pytest.mark.fast

VECTORS = Path(__file__).parent / "vectors"


def f16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.float16).astype(np.float32)


def layer(n_tokens=64, heads=4, head_dim=64, seed=0) -> np.ndarray:
    return f16(np.random.default_rng(seed).standard_normal((n_tokens, heads, head_dim)))


def smooth_layer(n_tokens=64, heads=4, head_dim=64, seed=0) -> np.ndarray:
    """Channels that vary slowly over time, with a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_tokens)[:, None, None]
    freq, phase = rng.uniform(0.01, 0.1, (heads, head_dim)), rng.uniform(0, 6.3, (heads, head_dim))
    level = rng.normal(0, 2, (heads, head_dim))
    return f16(level + 3 * np.sin(freq * t + phase) + 0.02 * rng.standard_normal((n_tokens, heads, head_dim)))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# --- golden vectors ---------------------------------------------------------------------------


def manifest_cases() -> list[tuple]:
    cases = []
    for line in (VECTORS / "manifest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, levels, group, rotation, channels, threshold, *bits = line.split()
            cases.append(
                (
                    name,
                    int(levels),
                    int(group),
                    int(rotation),
                    int(channels),
                    float.fromhex(threshold),
                    tuple(map(int, bits)),
                )
            )
    return cases


@pytest.mark.parametrize("case", manifest_cases(), ids=lambda case: case[0])
def test_golden_vector(case):
    name, levels, group, rotation, channels, threshold, bits = case
    codec = HaarCodec(levels=levels, bits=bits, hadamard=rotation > 1, group=group, threshold=threshold)
    block = np.frombuffer((VECTORS / f"{name}.in.bin").read_bytes(), "<f2").astype(np.float32).reshape(-1, channels)
    encoded = (VECTORS / f"{name}.bin").read_bytes()
    decoded = np.frombuffer((VECTORS / f"{name}.out.bin").read_bytes(), "<f4").reshape(block.shape)
    assert codec.encode_block(block, rotation) == encoded
    assert bits_equal(decode_block(encoded), decoded)
    as_layer = block.reshape(len(block), channels // rotation, rotation)
    out, size = codec.roundtrip(as_layer, "k")
    assert bits_equal(out.reshape(block.shape), decoded) and size == len(encoded)


def coarsen_cases() -> list[tuple[str, bytes, tuple[int, int], tuple[int, ...]]]:
    """(case, source block, channels, widths) of tests/vectors/coarsen/manifest.txt."""
    lines = (VECTORS / "coarsen" / "manifest.txt").read_text().splitlines()
    cases = []
    for name, source, channels, *bits in (ln.split() for ln in lines if ln[:1] != "#"):
        source_bin = VECTORS / f"{source}.bin"
        data = (source_bin if source_bin.exists() else VECTORS / "coarsen" / f"{source}.bin").read_bytes()
        c0, c1 = map(int, channels.split(":"))
        cases.append((name, data, (c0, c1), tuple(map(int, bits))))
    return cases


@pytest.mark.parametrize("case", coarsen_cases(), ids=lambda case: case[0])
def test_coarsening_golden_vector(case):
    name, data, channels, bits = case
    coarse = coarsen_block(data, bits, channels)
    assert coarse == (VECTORS / "coarsen" / f"{name}.bin").read_bytes()
    assert len(coarse) <= len(data)
    if channels == (0, int.from_bytes(data[4:6], "little")):
        assert coarse[8:][: len(bits)] == bytes(bits)
    if tuple(data[8 : 8 + len(bits)]) == bits:
        assert coarse == data


def test_coarsening_keeps_kept_subbands_and_drops_the_rest():
    codec = HaarCodec()  # balanced: 6.4.3.3.3
    x = smooth_layer(n_tokens=16, heads=4, head_dim=64, seed=3).reshape(16, 256)
    data = codec.encode_block(x, 64)
    full, coarse = decode_block(data), decode_block(coarsen_block(data, (6, 4, 3, 3, 0)))
    # D_1 dropped: each pair of tokens becomes its mean, exactly what the kept subbands say
    pairs = full.reshape(8, 2, 256).mean(axis=1)
    assert np.allclose(coarse.reshape(8, 2, 256), pairs[:, None], atol=1e-5)
    # narrowed: the same rows, values quantized again, so close to the block but not equal
    narrowed = decode_block(coarsen_block(data, (6, 4, 3, 3, 2)))
    assert 0 < np.abs(narrowed - full).mean() < 0.1 * np.abs(full).mean()


@pytest.mark.parametrize(
    "bits, message",
    [((6, 4, 3, 3), "needs 5 widths"), ((6, 5, 3, 3, 3), "from width 4 to 5"), ((6, 4, 1, 3, 3), "to 1")],
)
def test_coarsening_refuses_widths_it_cannot_reach(bits, message):
    data = (VECTORS / "normal.bin").read_bytes()
    with pytest.raises(ValueError, match=message):
        coarsen_block(data, bits)


def invalid_cases() -> list[tuple[str, str]]:
    lines = (VECTORS / "invalid" / "manifest.txt").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


def test_every_invalid_vector_is_listed():
    assert {name for name, _ in invalid_cases()} == {p.name for p in (VECTORS / "invalid").glob("*.bin")}


@pytest.mark.parametrize("name, word", invalid_cases())
def test_invalid_vector_is_rejected(name, word):
    with pytest.raises(ValueError, match=word):
        decode_block((VECTORS / "invalid" / name).read_bytes())


# --- the block codec --------------------------------------------------------------------------

CONFIGS = [
    HaarCodec(),
    HaarCodec(hadamard=False, group=16),
    HaarCodec(levels=2, bits=(7, 0, 3), group=8, threshold=0.3),
    HaarCodec(levels=3, bits=(16, 2, 9, 13), group=128, threshold=0.05),
    HaarCodec(levels=0, bits=(4,), group=32),
]


@pytest.mark.parametrize("codec", CONFIGS, ids=lambda c: c.spec())
@pytest.mark.parametrize("make", [layer, smooth_layer])
def test_roundtrip_equals_serialized_blocks(codec, make):
    x = make(n_tokens=4 * codec.block_tokens, heads=2, head_dim=64, seed=5)
    out, size = codec.roundtrip(x, "v")
    blocks = x.reshape(4, codec.block_tokens, 128)
    encoded = [codec.encode_block(block, 64) for block in blocks]
    assert bits_equal(out, np.stack([decode_block(e) for e in encoded]).reshape(x.shape))
    assert size == sum(map(len, encoded))


def test_threshold_drops_detail_groups():
    x = smooth_layer(seed=1)
    exact, size0 = HaarCodec(group=16).roundtrip(x, "k")
    dropped, size1 = HaarCodec(group=16, threshold=0.2).roundtrip(x, "k")
    assert size1 < size0 and rmse(dropped, x) > rmse(exact, x)
    assert rmse(dropped, x) < 0.2 * x.std()


def test_zero_groups_cost_one_bit_and_decode_to_zero():
    x = np.zeros((16, 4, 64), np.float32)
    x[:, 1] = 1.5  # constant in time: only A_L is present for this head
    out, size = HaarCodec(bits=(8, 6, 5, 4, 3), hadamard=False).roundtrip(x, "k")
    assert not out[:, [0, 2, 3]].any() and np.allclose(out, x, rtol=1e-2)
    assert size == 13 + 8 + 2 + 64 * 8 // 8  # header, bitmap, one scale, one group of 8-bit values


def test_sixteen_bits_is_within_f16_rounding():
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 1e4):
        x = f16(scale * rng.standard_normal((64, 4, 64)))
        out, _ = CODECS["haar-16"].roundtrip(x, "k")
        assert np.abs(out - x).max() <= 2.0**-12 * np.abs(x).max()  # half an f16 ulp at the largest value


def test_extreme_values_saturate_without_overflow():
    signs = np.random.default_rng(4).choice([-1.0, 1.0], (16, 2, 64)).astype(np.float32)
    out, _ = CODECS["haar"].roundtrip(65504 * signs, "k")
    assert np.isfinite(out).all()
    out, _ = CODECS["haar-16"].roundtrip(65504 * signs, "k")
    assert np.abs(out - 65504 * signs).max() <= 2.0**-11 * 65504


def test_more_bits_less_error():
    x = smooth_layer(seed=2)
    errors = [rmse(HaarCodec(bits=(b,) * 5).roundtrip(x, "k")[0], x) for b in (2, 3, 4, 6, 8, 12)]
    assert errors == sorted(errors, reverse=True)
    presets = [rmse(CODECS[name].roundtrip(x, "k")[0], x) for name in ("haar-lo", "haar", "haar-hi", "haar-16")]
    assert presets == sorted(presets, reverse=True)


def test_haar_beats_plain_quantization_on_smooth_signals():
    x = smooth_layer(seed=3)
    haar_out, haar_size = CODECS["haar"].roundtrip(x, "k")
    for plain in (CODECS["q4_0"], CODECS["q4_0+hadamard"], HaarCodec(levels=0, bits=(4,))):
        out, size = plain.roundtrip(x, "k")
        assert haar_size <= size * 1.01 and rmse(haar_out, x) < 0.5 * rmse(out, x), plain.name


def test_encode_rejects_bad_blocks():
    codec = HaarCodec()
    with pytest.raises(ValueError, match="shape"):
        codec.encode_block(np.zeros((8, 64), np.float32), 64)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode_block(np.full((16, 64), np.inf, np.float32), 64)
    with pytest.raises(ValueError, match="group=64 must divide"):
        codec.encode_block(np.zeros((16, 96), np.float32), 32)
    with pytest.raises(ValueError, match="power of two"):
        codec.encode_block(np.zeros((16, 192), np.float32), 48)


def test_hadamard_is_the_normalised_sylvester_matrix():
    h = np.array([[1.0]])
    for _ in range(5):
        h = np.block([[h, h], [h, -h]])
    x = np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32)
    rotated = hadamard_rotate(x, 32)
    assert np.allclose(rotated.reshape(3, 2, 32), x.reshape(3, 2, 32) @ h / np.sqrt(32), atol=1e-5)
    assert np.allclose(hadamard_rotate(rotated, 32), x, atol=1e-5)


# --- the evaluator's interface ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_registered_codec_interface(name):
    codec = CODECS[name]
    assert codec.name == name and codec.description and parse_codec(name) is codec
    assert codec.evicts == (name == "evict")
    assert dataclasses.is_dataclass(codec) and codec.__dataclass_params__.frozen
    assert parse_codec(codec.spec()) == codec
    x = layer(n_tokens=4 * max(codec.block_tokens, 16), heads=3, head_dim=64, seed=7)
    for role in ("k", "v"):
        out, size = codec.roundtrip(x, role)
        assert out.shape == x.shape and out.dtype == np.float32 and isinstance(size, int)
        assert (size == 0) == codec.evicts
    with pytest.raises(ValueError):
        codec.roundtrip(x, "q")
    if codec.block_tokens > 1:
        with pytest.raises(ValueError, match="multiple"):
            codec.roundtrip(x[:-1], "k")


def test_stock_sizes():
    assert CODECS["q8_0"].bits_per_element() == 8.5 and CODECS["q4_0"].bits_per_element() == 4.5
    assert CODECS["q4_0+hadamard"].bits_per_element() == 4.5 and CODECS["f16"].bits_per_element() == 16


def test_preset_sizes():
    measured = {name: CODECS[name].bits_per_element() for name in ("haar-hi", "haar", "haar-lo", "haar-noH")}
    assert 4.8 < measured["haar-hi"] < 5.6 and 3.4 < measured["haar"] < 3.7 and 3.2 < measured["haar-lo"] < 3.5
    assert measured["haar-noH"] == measured["haar"]


def test_ggml_reference_semantics():
    # q8_0: d = amax/127, q = roundf(x/d): halves go away from zero (rint would give 0 and -2)
    row = np.zeros((1, 1, 32), np.float32)
    row[0, 0, :3] = [127.0, 0.5, -2.5]
    out, _ = Q8_0().roundtrip(row, "k")
    assert list(out[0, 0, :3]) == [127.0, 1.0, -3.0]
    # q4_0: the signed extreme (first on ties) maps to -8, so +max decodes exactly and the other side clamps at 7
    row = np.zeros((1, 1, 32), np.float32)
    row[0, 0, :3] = [2.0, -2.0, -1.0]
    out, _ = Q4_0().roundtrip(row, "k")
    assert list(out[0, 0, :3]) == [2.0, -1.75, -1.0]


def test_against_gguf_quants():
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    x = layer(seed=8)
    for codec, qtype in ((CODECS["q8_0"], GGMLQuantizationType.Q8_0), (CODECS["q4_0"], GGMLQuantizationType.Q4_0)):
        rows = x.reshape(len(x), -1)
        expected = quants.dequantize(quants.quantize(rows, qtype), qtype).reshape(x.shape)
        assert bits_equal(codec.roundtrip(x, "k")[0], expected.astype(np.float32))


def test_kivi_and_pooling():
    x = smooth_layer(seed=9)
    assert rmse(Kivi(bits=4).roundtrip(x, "k")[0], x) < rmse(Kivi(bits=2).roundtrip(x, "k")[0], x)
    assert Kivi(bits=4).roundtrip(x, "v")[1] == x.size // 2 + 4 * x.size // 32
    out, size = Pooling(levels=2).roundtrip(x, "k")
    assert size == x.size // 2 and np.array_equal(out[0], out[3]) and not np.array_equal(out[3], out[4])
    assert np.allclose(out[0], x[:4].mean(axis=0), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown codec"),
        ("haar:levels=9,bits=8.8.8.8.8.8.8.8.8.8", "levels=9 is out of range: allowed 0 to 8"),
        ("haar:bits=8.6.5", "bits=8.6.5 is out of range: allowed exactly levels\\+1 = 5"),
        ("haar:bits=8.6.5.1.3", "widths 0 \\(subband dropped\\) or 2 to 16"),
        ("haar:group=0", "group=0 is out of range"),
        ("haar:threshold=-1", "threshold=-1.0 is out of range"),
        ("haar:threshold=nan", "threshold='nan' is not valid"),
        ("haar:hadamard=2", "hadamard='2' is not valid"),
        ("haar:levels=x", "levels='x' is not valid"),
        ("haar:colour=1", "unknown field 'colour': haar takes levels, bits, hadamard, group, threshold"),
        ("haar:levels=2,levels=3", "given twice"),
        ("kivi:bits=1", "bits=1 is out of range: allowed 2 to 8"),
        ("pool:levels=0", "levels=0 is out of range"),
        ("f16:bits=3", "f16 takes no fields"),
        # codecs per model layer
        ("haar@5=", "unknown codec ''"),
        ("haar@x=haar-lo", "'x=haar-lo' is not LAYERS=CODEC with LAYERS model layer numbers from 0"),
        ("haar@5,-1=haar-lo", "is not LAYERS=CODEC"),
        ("haar@haar-lo", "is not LAYERS=CODEC"),
        ("haar@5=haar-lo@5=haar-hi", "a layer is named twice"),
        ("haar@5=evict", "a layer's codec may not evict"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_codec(spec)


def test_parametrised_specs():
    codec = parse_codec("haar:levels=3,bits=8.5.4.3,hadamard=0,group=32,threshold=0.5")
    assert codec == HaarCodec(levels=3, bits=(8, 5, 4, 3), hadamard=False, group=32, threshold=0.5)
    assert codec.block_tokens == 8 and parse_codec(codec.name) == codec
    assert parse_codec("haar:levels=4") == CODECS["haar"]
    assert parse_codec("q4_0:hadamard=1") == CODECS["q4_0+hadamard"]
    assert parse_codec("kivi:bits=2") == CODECS["kivi2"] and parse_codec("pool:levels=2") == CODECS["pool4"]


def test_keys_and_values_take_codecs_of_their_own():
    x = np.random.default_rng(3).standard_normal((32, 3, 64)).astype(np.float32)
    codec = parse_codec("haar-hi|haar-lo")
    for role, alone in (("k", CODECS["haar-hi"]), ("v", CODECS["haar-lo"])):
        decoded, size = codec.roundtrip(x, role)
        want, want_size = alone.roundtrip(x, role)
        assert size == want_size and np.array_equal(decoded, want)
    assert parse_codec(codec.spec()) == codec
    assert parse_codec("f16|haar:levels=3").block_tokens == 8  # both compress whole blocks of both
    with pytest.raises(ValueError, match="neither K's codec nor V's may evict"):
        parse_codec("haar-hi|evict")


def test_layers_take_codecs_of_their_own():
    x = np.random.default_rng(4).standard_normal((32, 3, 64)).astype(np.float32)
    codec = parse_codec("haar-lo@5,11=haar-hi@17=haar|haar-lo")
    assert codec.layers_named == {5, 11, 17}
    for layer, keys in ((5, "haar-hi"), (11, "haar-hi"), (17, "haar"), (0, "haar-lo")):
        assert codec.for_layer(layer) == parse_codec(f"{keys}|haar-lo")
        decoded, size = codec.for_layer(layer).roundtrip(x, "k")
        want, want_size = CODECS[keys].roundtrip(x, "k")
        assert size == want_size and np.array_equal(decoded, want)
    assert parse_codec(codec.spec()) == codec
    assert parse_codec("f16@5=haar:levels=3@6=haar").block_tokens == 16  # whole blocks of every layer's codec
    with pytest.raises(ValueError, match="sets model layers apart: take one layer's codec with for_layer"):
        parse_codec("haar-lo@5=haar-hi").roundtrip(x, "k")
