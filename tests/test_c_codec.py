"""The C codec (kvggml/csrc/codec.cpp) against the golden vectors and the numpy reference.

Checked twice: in a library compiled from the source alone (fast, in this process), and
in the patched libllama itself (in a subprocess: the pytest process holds stock libllama).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvggml.codec import HaarCodec, decode_block
from kvggml.library import library_dir

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"


class Params(ctypes.Structure):
    _fields_ = [("levels", ctypes.c_int32), ("group", ctypes.c_int32), ("rotation", ctypes.c_int32),
                ("threshold", ctypes.c_float), ("bits", ctypes.c_uint8 * 9)]


def bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.kvggml_error_name.restype = ctypes.c_char_p
    lib.kvggml_codec_block_bound.restype = ctypes.c_size_t
    lib.kvggml_codec_encode_block.restype = ctypes.c_int64
    lib.kvggml_codec_encode_block.argtypes = [ctypes.POINTER(Params), ctypes.c_void_p, ctypes.c_int32,
                                              ctypes.c_void_p, ctypes.c_size_t]
    lib.kvggml_codec_decode_block.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_void_p,
                                              ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32)]
    return lib


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
    assert n > 0, lib.kvggml_error_name(int(n)).decode()
    return out.raw[:n]


def decode(lib, data: bytes, channels: int, tokens_max: int = 256) -> tuple[int, np.ndarray | None]:
    out = np.empty(tokens_max * channels, np.float32)
    tokens = ctypes.c_int32(0)
    rc = lib.kvggml_codec_decode_block(data, len(data), channels, out.ctypes.data, out.size, ctypes.byref(tokens))
    return rc, (out[: tokens.value * channels].reshape(tokens.value, channels) if rc == 0 else None)


def manifest_cases():
    for line in (VECTORS / "manifest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, L, G, R, C, threshold, *bits = line.split()
            yield name, int(L), int(G), int(R), int(C), float.fromhex(threshold), [int(b) for b in bits]


def check_vectors(lib) -> int:
    count = 0
    for name, L, G, R, C, threshold, bits in manifest_cases():
        x = np.fromfile(VECTORS / f"{name}.in.bin", dtype="<f2").astype(np.float32).reshape(1 << L, C)
        expected = (VECTORS / f"{name}.bin").read_bytes()
        assert encode(lib, make_params(L, G, R, threshold, bits), x) == expected, f"{name}: bytes differ"
        rc, out = decode(lib, expected, C)
        assert rc == 0, f"{name}: {lib.kvggml_error_name(rc).decode()}"
        want = np.fromfile(VECTORS / f"{name}.out.bin", dtype="<f4").reshape(1 << L, C)
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), f"{name}: decoded values differ"
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
        rc, _ = decode(lib, data, channels)
        assert rc < 0, f"{file} was accepted"
        name = lib.kvggml_error_name(rc).decode()
        assert word in name, f"{file}: rejected as {name!r}, expected {word!r}"
        count += 1
    return count


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("codec") / "libkvggml_codec.so"
    subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-I",
                    str(REPO / "kvggml/csrc/include"), str(REPO / "kvggml/csrc/codec.cpp"), "-o", str(out)], check=True)
    return bind(str(out))


def test_golden_vectors(standalone):
    assert check_vectors(standalone) >= 15


def test_malformed_blocks_are_rejected(standalone):
    assert check_invalid(standalone) >= 20


def test_random_blocks_match_the_reference(standalone):
    rng = np.random.default_rng(7)
    for _ in range(300):
        levels = int(rng.integers(0, 6))
        head_dim = int(rng.choice([16, 32, 64]))
        channels = head_dim * int(rng.integers(1, 4))
        group = int(rng.choice([g for g in (8, 16, 32, 64) if channels % g == 0]))
        bits = tuple(int(b) for b in rng.choice([0, 2, 3, 4, 5, 6, 8, 12, 16], size=levels + 1))
        hadamard = bool(rng.integers(0, 2))
        threshold = float(rng.choice([0.0, 0.25, 0.5]))
        x = (rng.standard_normal((1 << levels, channels)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float16)
        x = x.astype(np.float32)
        ref = HaarCodec(levels=levels, bits=bits, hadamard=hadamard, group=group, threshold=threshold)
        data = ref.encode_block(x, head_dim)
        got = encode(standalone, make_params(levels, group, head_dim if hadamard else 1, threshold, bits), x)
        assert got == data, ref.spec()
        rc, out = decode(standalone, data, channels)
        assert rc == 0 and np.array_equal(out.view(np.uint32), decode_block(data).view(np.uint32)), ref.spec()


def test_the_patched_library_carries_the_same_codec():
    path = library_dir("patched") / "libllama.so"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_c_codec as t; lib = t.bind(sys.argv[2]); "
            "print(t.check_vectors(lib), t.check_invalid(lib))")
    res = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ})
    assert res.returncode == 0, res.stderr[-3000:]
    vectors, invalid = map(int, res.stdout.split())
    assert vectors >= 15 and invalid >= 20
