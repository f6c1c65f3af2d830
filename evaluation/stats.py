"""The statistics behind the accuracy gate: every figure it decides on comes with a 95 % interval.

- a proportion (top-1 agreement): the Wilson score interval;
- a paired change (accuracy or recall, INT8 vs FP32 on the same samples): the exact McNemar test on the
  discordant pairs, and a percentile interval from a paired bootstrap (seeded, so reports are reproducible).
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 4000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n trials."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value that the new model is worse: P(X >= lost), X ~ Binomial(lost + gained, 1/2).
    `lost`: samples the reference got right and the new model got wrong; `gained`: the reverse."""
    n = lost + gained
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(lost, n + 1)) / 2**n)


def paired_delta(ref_correct: np.ndarray, new_correct: np.ndarray, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Change in the rate of correct answers (new - ref) on the same samples, with a paired-bootstrap 95 %
    interval and the exact one-sided McNemar p-value of a loss."""
    ref_correct, new_correct = np.asarray(ref_correct, bool), np.asarray(new_correct, bool)
    n = len(ref_correct)
    lost = int((ref_correct & ~new_correct).sum())
    gained = int((~ref_correct & new_correct).sum())
    if n == 0:
        return {"n": 0, "delta": None, "ci95": [None, None], "lost": 0, "gained": 0, "mcnemar_p_loss": 1.0}
    diff = new_correct.astype(np.int8) - ref_correct.astype(np.int8)
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, n, size=(resamples, n))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": n, "delta": float(diff.mean()), "ci95": [float(lo), float(hi)], "lost": lost, "gained": gained,
            "mcnemar_p_loss": mcnemar_exact(lost, gained)}


def max_failures(n: int, floor: float) -> int:
    """The most failures of n trials whose Wilson lower bound still reaches `floor` (-1: not even none)."""
    k = -1
    while k + 1 <= n and wilson(n - (k + 1), n)[0] >= floor - 1e-9:
        k += 1
    return k


def predicted_pass(successes: int, n: int, future_n: int, floor: float) -> float:
    """The chance that a new sample of future_n trials from the same population shows a Wilson lower bound >=
    `floor`, given `successes` of n seen: the beta-binomial predictive of the failures under the Jeffreys
    posterior of the failure rate. It is how val predicts the gate's held-out set: the same bound, its own
    sampling noise on both sides."""
    allowed = max_failures(future_n, floor)
    if allowed < 0:
        return 0.0
    a, b = n - successes + 0.5, successes + 0.5
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def log_pmf(k: int) -> float:
        return (math.lgamma(future_n + 1) - math.lgamma(k + 1) - math.lgamma(future_n - k + 1)
                + math.lgamma(k + a) + math.lgamma(future_n - k + b) - math.lgamma(future_n + a + b) - log_beta)

    return min(1.0, sum(math.exp(log_pmf(k)) for k in range(allowed + 1)))
