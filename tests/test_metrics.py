"""The KL divergence the evaluator and the tier tests report (kvggml/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax

from kvggml.metrics import kld_per_row, mean_kld

pytestmark = pytest.mark.fast


def test_identical_logits_give_zero():
    logits = np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32)
    assert mean_kld(logits, logits) == 0.0
    assert (kld_per_row(log_softmax(logits, axis=-1), log_softmax(logits, axis=-1)) == 0.0).all()


def test_two_rows_by_hand():
    # row 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    # row 1: equal up to a shift of the logits, which softmax ignores: KL = 0
    reference = np.array([[0.0, 0.0], [1.0, 2.0]])
    other = np.array([[0.0, math.log(3)], [5.0, 6.0]])
    row0 = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    per_row = kld_per_row(log_softmax(reference, axis=-1), log_softmax(other, axis=-1))
    assert per_row == pytest.approx([row0, 0.0], abs=1e-15)
    assert mean_kld(reference, other) == pytest.approx(row0 / 2, abs=1e-15)


def test_asymmetric():
    p, q = np.array([[0.0, 0.0]]), np.array([[0.0, math.log(3)]])
    forward, backward = mean_kld(p, q), mean_kld(q, p)
    assert forward == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert backward == pytest.approx(0.25 * math.log(1 / 2) + 0.75 * math.log(3 / 2))
    assert forward != pytest.approx(backward)


def test_float64_and_never_negative():
    # float32 log-probabilities, as the evaluator has them; a sum below 0 is rounding, reported as 0
    logp = log_softmax(np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32), axis=-1)
    kld = kld_per_row(logp, logp + np.float32(1e-3))
    assert kld.dtype == np.float64 and (kld == 0.0).all()
