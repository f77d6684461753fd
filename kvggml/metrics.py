"""How far one run's next-token distributions are from a reference run's."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def kld_per_row(reference_logp: np.ndarray, other_logp: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_other) of each row, in float64, from log-probabilities (n_rows, n_vocab).

    Clamped at 0: float rounding can give -1e-12 for identical rows.
    """
    reference_logp = reference_logp.astype(np.float64)
    kld = (np.exp(reference_logp) * (reference_logp - other_logp.astype(np.float64))).sum(axis=-1)
    return np.maximum(kld, 0.0)


def mean_kld(reference_logits: np.ndarray, other_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(other)), logits (n_rows, n_vocab), in float64."""
    reference_logp = log_softmax(reference_logits.astype(np.float64), axis=-1)
    other_logp = log_softmax(other_logits.astype(np.float64), axis=-1)
    return float(kld_per_row(reference_logp, other_logp).mean())
