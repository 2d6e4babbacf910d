"""Scores from per-instance results; definitions follow lm-evaluation-harness and the Codex paper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc: the highest log-likelihood is gold; acc_norm: the same per character of the answer."""
    scores = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return {
        "acc": float(np.argmax(scores) == gold),
        "acc_norm": float(np.argmax(scores / np.maximum(lengths, 1.0)) == gold),
    }


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), computed stably."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def exact_match(prediction: str, reference: str) -> float:
    """Exact string equality, as lm-eval's exact_match with its default flags."""
    return float(prediction == str(reference))


def perplexity_of(lls: Sequence[float]) -> float:
    """lm-eval's perplexity metric for loglikelihood tasks: exp of the mean negative log-likelihood."""
    return math.exp(-float(np.mean(lls)))
