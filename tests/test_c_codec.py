"""The C codec (kvggml/csrc/codec.cpp, docs/FORMAT.md) against the golden vectors and the numpy reference.

Checked twice: in a library compiled from the source alone (fast, in this process), and
in the patched libllama itself (in a subprocess: the pytest process holds stock libllama).
The checks take a loaded library (`bind(path)`), so any build of the C API can be tested.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from kvggml.codecs import HaarCodec, coarsen_block, decode_block
from kvggml.library import library_dir

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"
STRIDE_PAD = 5  # extra f16 elements between rows, to exercise the row stride


class Params(ctypes.Structure):
    _fields_ = [
        ("levels", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("rotation", ctypes.c_int32),
        ("threshold", ctypes.c_float),
        ("bits", ctypes.c_uint8 * 9),
    ]


def bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    ptr, size, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32
    params = ctypes.POINTER(Params)
    signatures = {
        "kvggml_error_name": (ctypes.c_char_p, [i32]),
        "kvggml_codec_block_bound": (size, [params, i32]),
        "kvggml_codec_encode_block": (ctypes.c_int64, [params, ptr, i32, ptr, size]),
        "kvggml_codec_encode_block_f16": (ctypes.c_int64, [params, ptr, size, i32, ptr, size]),
        "kvggml_codec_decode_block": (i32, [ctypes.c_char_p, size, i32, ptr, size, ctypes.POINTER(i32)]),
        "kvggml_codec_decode_block_f16": (i32, [ctypes.c_char_p, size, i32, ptr, size, size, ctypes.POINTER(i32)]),
        "kvggml_codec_coarsen_block": (ctypes.c_int64, [ctypes.c_char_p, size, i32, ctypes.c_char_p, size, ptr, size]),
        "kvggml_codec_coarsen_channels": (
            ctypes.c_int64,
            [ctypes.c_char_p, size, i32, ctypes.c_char_p, size, i32, i32, ptr, size],
        ),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def error_name(lib, code: int) -> str:
    return lib.kvggml_error_name(code).decode()


def make_params(levels: int, group: int, rotation: int, threshold: float, bits) -> Params:
    p = Params(levels, group, rotation, threshold)
    for k, b in enumerate(bits):
        p.bits[k] = b
    return p


def encode(lib, params: Params, x: np.ndarray) -> bytes:
    x = np.ascontiguousarray(x, np.float32)
    cap = lib.kvggml_codec_block_bound(ctypes.byref(params), x.shape[1])
    out = ctypes.create_string_buffer(cap)
    n = lib.kvggml_codec_encode_block(ctypes.byref(params), x.ctypes.data, x.shape[1], out, cap)
    assert n > 0, error_name(lib, n)
    return out.raw[:n]


def encode_f16(lib, params: Params, x: np.ndarray) -> bytes:
    """Encode f16 rows stored with a stride wider than the row."""
    tokens, channels = x.shape
    rows = np.zeros((tokens, channels + STRIDE_PAD), np.float16)
    rows[:, :channels] = x
    cap = lib.kvggml_codec_block_bound(ctypes.byref(params), channels)
    out = ctypes.create_string_buffer(cap)
    n = lib.kvggml_codec_encode_block_f16(ctypes.byref(params), rows.ctypes.data, rows.shape[1], channels, out, cap)
    assert n > 0, error_name(lib, n)
    return out.raw[:n]


def decode(lib, data: bytes, channels: int, tokens_max: int = 256) -> tuple[int, np.ndarray | None]:
    out = np.empty(tokens_max * channels, np.float32)
    tokens = ctypes.c_int32(0)
    rc = lib.kvggml_codec_decode_block(data, len(data), channels, out.ctypes.data, out.size, ctypes.byref(tokens))
    return rc, (out[: tokens.value * channels].reshape(tokens.value, channels) if rc == 0 else None)


def decode_f16(lib, data: bytes, channels: int, tokens_max: int = 256) -> tuple[int, np.ndarray | None]:
    """Decode into f16 rows with a stride; the gaps between rows must stay untouched."""
    sentinel = 0x7E01  # a NaN pattern the decoder never writes
    out = np.full((tokens_max, channels + STRIDE_PAD), sentinel, np.uint16)
    tokens = ctypes.c_int32(0)
    rc = lib.kvggml_codec_decode_block_f16(
        data, len(data), channels, out.ctypes.data, out.shape[1], out.size, ctypes.byref(tokens)
    )
    if rc != 0:
        return rc, None
    assert np.all(out[:, channels:] == sentinel) and np.all(out[tokens.value :] == sentinel), "wrote outside the rows"
    return rc, out[: tokens.value, :channels]


def assert_decodes_to(lib, data: bytes, channels: int, want: np.ndarray, what: str) -> None:
    """Decoded float32 bit for bit, and its f16 rounding as numpy's astype(np.float16)."""
    rc, out = decode(lib, data, channels)
    assert rc == 0, f"{what}: {error_name(lib, rc)}"
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), f"{what}: decoded values differ"
    rc, out16 = decode_f16(lib, data, channels)
    assert rc == 0, f"{what}: {error_name(lib, rc)}"
    with np.errstate(over="ignore"):
        want16 = want.astype(np.float16)
    assert np.array_equal(out16, want16.view(np.uint16)), f"{what}: decoded f16 values differ"


def manifest_cases():
    for line in (VECTORS / "manifest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, L, G, R, C, threshold, *bits = line.split()
            yield name, int(L), int(G), int(R), int(C), float.fromhex(threshold), [int(b) for b in bits]


def check_vectors(lib) -> int:
    count = 0
    for name, L, G, R, C, threshold, bits in manifest_cases():
        x16 = np.fromfile(VECTORS / f"{name}.in.bin", dtype="<f2").reshape(1 << L, C)
        expected = (VECTORS / f"{name}.bin").read_bytes()
        params = make_params(L, G, R, threshold, bits)
        assert encode(lib, params, x16.astype(np.float32)) == expected, f"{name}: bytes differ"
        assert encode_f16(lib, params, x16) == expected, f"{name}: bytes from f16 rows differ"
        want = np.fromfile(VECTORS / f"{name}.out.bin", dtype="<f4").reshape(1 << L, C)
        assert_decodes_to(lib, expected, C, want, name)
        count += 1
    return count


def coarsen(lib, data: bytes, bits, capacity: int | None = None, channels=None) -> tuple[int, bytes]:
    """(return code, coarsened bytes) of kvggml_codec_coarsen_block, or with `channels` (c0, c1)
    of kvggml_codec_coarsen_channels."""
    n_channels = int.from_bytes(data[4:6], "little")
    out = ctypes.create_string_buffer(max(len(data) if capacity is None else capacity, 1))
    capacity = len(out) if capacity is None else capacity
    if channels is None:
        rc = lib.kvggml_codec_coarsen_block(data, len(data), n_channels, bytes(bits), len(bits), out, capacity)
    else:
        rc = lib.kvggml_codec_coarsen_channels(
            data, len(data), n_channels, bytes(bits), len(bits), *channels, out, capacity
        )
    return rc, out.raw[: max(rc, 0)]


def check_coarsen_vectors(lib) -> int:
    count = 0
    for line in (VECTORS / "coarsen" / "manifest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, source, channels, *bits = line.split()
            source_bin = VECTORS / f"{source}.bin"
            block = (source_bin if source_bin.exists() else VECTORS / "coarsen" / f"{source}.bin").read_bytes()
            c0, c1 = map(int, channels.split(":"))
            rc, data = coarsen(lib, block, [int(b) for b in bits], channels=(c0, c1))
            assert rc > 0 and data == (VECTORS / "coarsen" / f"{name}.bin").read_bytes(), f"coarsen/{name}: {rc}"
            count += 1
    return count


def check_invalid(lib) -> int:
    count = 0
    for line in (VECTORS / "invalid" / "manifest.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        file, word = line.split("\t")
        data = (VECTORS / "invalid" / file).read_bytes()
        channels = int.from_bytes(data[4:6], "little") if len(data) >= 6 else 1
        for decoder in (decode, decode_f16):
            rc, _ = decoder(lib, data, channels)
            assert rc < 0, f"{file} was accepted by {decoder.__name__}"
            assert word in error_name(lib, rc), f"{file}: rejected as {error_name(lib, rc)!r}, expected {word!r}"
        count += 1
    return count


def pack_block(levels: int, group: int, bits, scales: np.ndarray, q: np.ndarray) -> bytes:
    """A block with every group present and no rotation, written straight from FORMAT.md section 6."""
    channels = q.shape[1]
    header = bytes([0x57, 1, levels, 0]) + channels.to_bytes(2, "little") + group.to_bytes(2, "little") + bytes(bits)
    n_groups = scales.size
    bitmap = np.packbits(np.ones(n_groups, np.uint8), bitorder="little").tobytes()
    # rows in Mallat order: row r belongs to the subband k with first_row(k) <= r
    widths = [bits[0]] + [bits[k] for k in range(1, levels + 1) for _ in range(1 << (k - 1))]
    stream = np.concatenate(
        [((q[r].astype(np.int64)[:, None] >> np.arange(b)) & 1).ravel() for r, b in enumerate(widths)]
    ).astype(np.uint8)
    values = np.packbits(stream, bitorder="little").tobytes()
    return header + bitmap + scales.astype("<u2").tobytes() + values


# the portable code alone, AVX2/F16C without AVX-512, and the x86 build (each kernel where this CPU has it)
@pytest.fixture(
    scope="session",
    params=[["-DKVGGML_CODEC_PORTABLE"], ["-DKVGGML_CODEC_NO_AVX512"], []],
    ids=["portable", "avx2", "x86"],
)
def standalone_path(request, tmp_path_factory) -> str:
    """libkvggml_codec.so compiled from codec.cpp alone, as libllama compiles it."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build the codec library")
    out = tmp_path_factory.mktemp("codec") / "libkvggml_codec.so"
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O2",
            "-ffp-contract=off",
            "-fPIC",
            "-shared",
            *request.param,
            "-I",
            str(REPO / "kvggml/csrc/include"),
            "-I",
            str(REPO / "kvggml/csrc"),
            str(REPO / "kvggml/csrc/codec.cpp"),
            "-o",
            str(out),
        ],
        check=True,
    )
    return str(out)


@pytest.fixture(scope="session")
def codec_lib(standalone_path) -> ctypes.CDLL:
    return bind(standalone_path)


def test_golden_vectors(codec_lib):
    assert check_vectors(codec_lib) >= 15


def test_coarsening_golden_vectors(codec_lib):
    assert check_coarsen_vectors(codec_lib) >= 16


def test_random_coarsenings_match_the_reference(codec_lib):
    rng = np.random.default_rng(11)
    for _ in range(300):
        ref, head_dim, x16 = random_block(rng)
        data = ref.encode_block(x16.astype(np.float32), head_dim)
        narrower = tuple(0 if b == 0 else int(rng.choice([0, *range(2, b + 1)])) for b in ref.bits)
        assert coarsen(codec_lib, data, narrower) == (len(coarsen_block(data, narrower)), coarsen_block(data, narrower))


def test_random_head_drops_match_the_reference(codec_lib):
    # section 11: subbands dropped from one head's channels, as the hierarchy steps a KV head
    rng = np.random.default_rng(12)
    for _ in range(300):
        ref, head_dim, x16 = random_block(rng)
        data = ref.encode_block(x16.astype(np.float32), head_dim)
        channels = int.from_bytes(data[4:6], "little")
        if head_dim % ref.group or channels == head_dim:
            continue
        head = int(rng.integers(channels // head_dim))
        span = (head * head_dim, (head + 1) * head_dim)
        dropped = tuple(0 if b == 0 or rng.random() < 0.5 else b for b in ref.bits)
        want = coarsen_block(data, dropped, span)
        assert coarsen(codec_lib, data, dropped, channels=span) == (len(want), want)
        np.testing.assert_array_equal(
            np.delete(decode_block(want), np.s_[span[0] : span[1]], axis=1),
            np.delete(decode_block(data), np.s_[span[0] : span[1]], axis=1),
        )


def test_coarsening_refuses_what_it_cannot_do(codec_lib):
    data = (VECTORS / "normal.bin").read_bytes()  # widths 6.4.3.3.3
    assert error_name(codec_lib, coarsen(codec_lib, data, [6, 5, 3, 3, 3])[0]) == "bits out of range"  # wider
    assert error_name(codec_lib, coarsen(codec_lib, data, [6, 4, 1, 3, 3])[0]) == "bits out of range"
    assert error_name(codec_lib, coarsen(codec_lib, data, [6, 4, 3, 3])[0]) == "invalid argument"  # L + 1 widths
    assert (
        error_name(codec_lib, coarsen(codec_lib, data, [6, 4, 3, 3, 0], len(data) - 1)[0]) == "output buffer too small"
    )
    assert error_name(codec_lib, coarsen(codec_lib, data[:-1], [6, 4, 3, 3, 0])[0]) == "truncated data"
    two_heads = (VECTORS / "heads64.bin").read_bytes()  # 128 channels, groups of 64
    # a channel range may only drop a subband, and must be whole groups inside the block
    assert error_name(codec_lib, coarsen(codec_lib, two_heads, [6, 4, 3, 3, 2], channels=(0, 64))[0]) == (
        "bits out of range"
    )
    for span in [(0, 32), (64, 192), (64, 64), (-64, 64)]:
        rc = coarsen(codec_lib, two_heads, [6, 4, 3, 3, 0], channels=span)[0]
        assert error_name(codec_lib, rc) == "invalid argument", span
    with pytest.raises(ValueError, match=r"channel range \[0, 32\) not allowed"):
        coarsen_block(two_heads, (6, 4, 3, 3, 0), (0, 32))
    with pytest.raises(ValueError, match="can only be dropped"):
        coarsen_block(two_heads, (6, 4, 3, 3, 2), (0, 64))


def test_malformed_blocks_are_rejected(codec_lib):
    assert check_invalid(codec_lib) >= 20


def random_block(rng: np.random.Generator) -> tuple[HaarCodec, int, np.ndarray]:
    """(codec, head_dim, f16 block) of random levels, heads, group, widths, rotation, threshold and scale."""
    levels = int(rng.integers(0, 6))
    head_dim = int(rng.choice([16, 32, 64]))
    channels = head_dim * int(rng.integers(1, 4))
    # groups of 4 start values mid-byte: the decoder's unaligned path
    group = int(rng.choice([g for g in (4, 8, 16, 32, 64) if channels % g == 0]))
    bits = tuple(int(b) for b in rng.choice([0, 2, 3, 4, 5, 6, 8, 12, 16], size=levels + 1))
    hadamard = bool(rng.integers(0, 2))
    threshold = float(rng.choice([0.0, 0.25, 0.5]))
    x16 = (rng.standard_normal((1 << levels, channels)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float16)
    return HaarCodec(levels=levels, bits=bits, hadamard=hadamard, group=group, threshold=threshold), head_dim, x16


def test_random_blocks_match_the_reference(codec_lib):
    rng = np.random.default_rng(7)
    for _ in range(300):
        ref, head_dim, x16 = random_block(rng)
        x = x16.astype(np.float32)
        data = ref.encode_block(x, head_dim)
        params = make_params(ref.levels, ref.group, head_dim if ref.hadamard else 1, ref.threshold, ref.bits)
        assert encode(codec_lib, params, x) == data, ref.spec()
        assert encode_f16(codec_lib, params, x16) == data, ref.spec()
        assert_decodes_to(codec_lib, data, x.shape[1], decode_block(data), ref.spec())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 12])
def test_a_value_the_encoder_never_writes_is_rejected_in_any_lane(codec_lib, bits):
    # -2^(b-1) at each position of a 64-channel group (the decoder reads 8 values at a time)
    rng = np.random.default_rng(bits)
    qmax = (1 << (bits - 1)) - 1
    for position in range(64):
        q = rng.integers(-qmax, qmax + 1, size=(1, 64))
        q[0, position] = -(1 << (bits - 1))
        data = pack_block(0, 64, [bits], np.full((1, 1), 0x3C00, np.uint16), q)
        rc, _ = decode(codec_lib, data, 64)
        assert error_name(codec_lib, rc) == "value out of range", (bits, position)
    q[0, :] = qmax
    assert decode(codec_lib, pack_block(0, 64, [bits], np.full((1, 1), 0x3C00, np.uint16), q), 64)[0] == 0


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_f16_rounding_of_any_scale_and_value(codec_lib, levels):
    # 16-bit values times every kind of f16 scale (subnormal to 65504) reach f16 subnormals,
    # halfway cases and overflow to infinity; the Haar steps add inexact values
    rng = np.random.default_rng(levels)
    tokens, channels = 1 << levels, 4096
    scales = rng.integers(1, 0x7C00, size=(tokens, channels), dtype=np.uint16)
    q = rng.integers(-32767, 32768, size=(tokens, channels))
    q[:, ::7] = rng.integers(-8, 9, size=q[:, ::7].shape)  # small products: subnormal results
    data = pack_block(levels, 1, [16] * (levels + 1), scales, q)
    assert_decodes_to(codec_lib, data, channels, decode_block(data), f"levels={levels}")


def test_api_contract(codec_lib):
    params = make_params(2, 8, 16, 0.0, [8, 4, 3])
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    data = encode(codec_lib, params, x)
    assert len(data) <= codec_lib.kvggml_codec_block_bound(ctypes.byref(params), 32)
    assert codec_lib.kvggml_codec_block_bound(ctypes.byref(params), 33) == 0

    def encode_rc(x, cap=10_000):
        out = ctypes.create_string_buffer(cap)
        return codec_lib.kvggml_codec_encode_block(ctypes.byref(params), x.ctypes.data, 32, out, cap)

    x_inf = x.copy()
    x_inf[3, 31] = np.inf
    assert "non-finite input" in error_name(codec_lib, encode_rc(x_inf))
    assert "too small" in error_name(codec_lib, encode_rc(x, cap=len(data) - 1))
    assert "invalid argument" in error_name(codec_lib, decode(codec_lib, data, 64)[0])  # another channel count
    out = np.empty(4 * 32 - 1, np.float32)
    rc = codec_lib.kvggml_codec_decode_block(data, len(data), 32, out.ctypes.data, out.size, None)
    assert "too small" in error_name(codec_lib, rc)


def test_the_patched_library_carries_the_same_codec():
    path = library_dir("patched") / "libllama.so"
    res = run_script("codec_in_library", str(path), timeout=300)
    vectors, invalid, coarsened = map(int, res.stdout.split())
    assert vectors >= 15 and invalid >= 20 and coarsened >= 10


def test_the_codec_benchmark_builds_runs_and_refuses_bad_arguments(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build the benchmark")
    exe = tmp_path / "bench_codec"
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O2",
            "-ffp-contract=off",
            "-I",
            str(REPO / "kvggml/csrc"),
            "-I",
            str(REPO / "kvggml/csrc/include"),
            str(REPO / "scripts/bench_codec.cpp"),
            str(REPO / "kvggml/csrc/codec.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    for rotation in ("1", "64"):
        res = subprocess.run([str(exe), rotation, "1"], capture_output=True, text=True)
        assert res.returncode == 0 and f"rotation {rotation}: " in res.stdout and "ns per decoded element" in res.stdout
    res = subprocess.run([str(exe), "3", "1"], capture_output=True, text=True)
    assert res.returncode == 2 and "rotation: 1 or a power of two dividing 192" in res.stderr
