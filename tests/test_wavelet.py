"""Properties of the Haar reference (kvggml/wavelet.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvggml.wavelet import haar_forward, haar_inverse, subband_slices

pytestmark = pytest.mark.fast


@st.composite
def blocks(draw, dtype=np.float64):
    """(array with axis 0 = tokens, levels): B = 2^levels * m tokens, random trailing shape."""
    levels = draw(st.integers(0, 6))
    tokens = (1 << levels) * draw(st.integers(1, 3))
    trailing = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return (scale * rng.standard_normal((tokens, *trailing))).astype(dtype), levels


@settings(max_examples=60, deadline=None)
@given(blocks())
def test_perfect_reconstruction_float64(case):
    x, levels = case
    c = haar_forward(x, levels)
    assert c.shape == x.shape and c.dtype == np.float64
    assert np.abs(haar_inverse(c, levels) - x).max(initial=0) < 1e-12 * max(1.0, np.abs(x).max(initial=0))


@settings(max_examples=60, deadline=None)
@given(blocks())
def test_parseval(case):
    x, levels = case
    c = haar_forward(x, levels)
    assert np.isclose((c**2).sum(), (x**2).sum(), rtol=1e-12, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(blocks(np.float32))
def test_float32_stays_float32(case):
    x, levels = case
    c = haar_forward(x, levels)
    assert c.dtype == np.float32 and haar_inverse(c, levels).dtype == np.float32
    assert np.allclose(haar_inverse(c, levels), x, rtol=1e-5, atol=1e-5 * np.abs(x).max(initial=0))


def test_level_zero_is_identity():
    x = np.random.default_rng(0).standard_normal((6, 3))
    assert np.array_equal(haar_forward(x, 0), x) and np.array_equal(haar_inverse(x, 0), x)


def test_mallat_layout_by_hand():
    x = np.array([1.0, 3.0, 5.0, 7.0])
    s = 1 / np.sqrt(2)
    a1, d1 = [(1 + 3) * s, (5 + 7) * s], [(1 - 3) * s, (5 - 7) * s]
    expected = [(a1[0] + a1[1]) * s, (a1[0] - a1[1]) * s, *d1]
    assert np.array_equal(haar_forward(x, 2), expected)


def test_float32_operation_order():
    """One rounding per operation, (x0 + x1) * s with s = float32(1/sqrt(2)), as docs/FORMAT.md states."""
    x = np.random.default_rng(1).standard_normal((2, 1000)).astype(np.float32)
    s = np.float32(1 / np.sqrt(2))
    assert s.view(np.uint32) == 0x3F3504F3
    expected = np.stack([(x[0] + x[1]) * s, (x[0] - x[1]) * s])
    assert np.array_equal(haar_forward(x, 1).view(np.uint32), expected.view(np.uint32))


def test_axis_argument_transforms_each_block():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 8, 3)).astype(np.float32)  # (n_blocks, B, channels)
    c = haar_forward(x, 3, axis=1)
    for i in range(5):
        assert np.array_equal(c[i], haar_forward(x[i], 3))
    assert np.array_equal(haar_inverse(c, 3, axis=1)[2], haar_inverse(c[2], 3))


def test_block_not_divisible_is_rejected():
    with pytest.raises(ValueError, match=r"12 tokens .* 2\*\*levels = 8"):
        haar_forward(np.zeros((12, 2)), 3)
    with pytest.raises(ValueError, match="12 tokens"):
        haar_inverse(np.zeros((12, 2)), 3)
    with pytest.raises(ValueError, match="floating"):
        haar_forward(np.zeros(4, dtype=np.int32), 1)


def test_subband_slices():
    assert subband_slices(16, 4) == [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 8), slice(8, 16)]
    assert subband_slices(8, 1) == [slice(0, 4), slice(4, 8)]
    assert subband_slices(4, 0) == [slice(0, 4)]
    with pytest.raises(ValueError, match="6 tokens"):
        subband_slices(6, 2)


def test_subbands_of_a_constant_and_a_ramp():
    """A constant lives in A_L only; a unit ramp has the same D_1 coefficient everywhere."""
    c = haar_forward(np.full(16, 2.0), 4)
    assert np.allclose(c[1:], 0) and np.isclose(c[0], 2.0 * 4)
    d1 = haar_forward(np.arange(16.0), 4)[subband_slices(16, 4)[-1]]
    assert np.allclose(d1, -1 / np.sqrt(2))
