"""The linear datamodeling score (LDS): do predicted changes of the final loss rank edited curricula right?

For each base run, many random edits of its curriculum (draws) are retrained for real and predicted by a
method; both give, per draw and test example, the change of the final loss against the unedited base. For
each test example, the Spearman correlation over draws between the predicted and the real change
(:func:`per_test_rho`) is averaged over test examples and base runs (:func:`mean_lds`); a bootstrap over draws
gives its interval (:func:`lds_bootstrap_interval`). :func:`sign_agreement` and :func:`magnitude_ratio` say
whether the predictions also get the direction and the size right; :func:`lds_scores` computes all of them.
The draws and their retraining live in :mod:`simfluence.apps.lds`.

Conventions for degenerate cases (no RuntimeWarning is raised): a test example whose real change does not vary
over the draws says nothing about ranking and is left out; one whose predicted change does not vary (or is not
finite) counts as correlation 0; a method whose predictions vary for no test example (``mean_curve``) has an
undefined LDS (NaN), sign agreement 0 and magnitude ratio 0.
"""
from __future__ import annotations

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.metrics.trajectory import spearman


def per_test_rho(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spearman over draws per test example, with the degenerate cases of the module docstring.

    Parameters
    ----------
    predicted, actual : (..., n_draws, n_test) changes of the final loss.

    Returns
    -------
    rho : (..., n_test) correlation, 0 where the predictions do not vary.
    informative : (..., n_test) True where the real change varies over the draws (the tests that count).
    varies : (..., n_test) True where the predicted change varies over the draws.
    """
    rho = spearman(predicted, actual, axis=-2)
    informative = actual.max(axis=-2) > actual.min(axis=-2)  # False where NaN
    varies = predicted.max(axis=-2) > predicted.min(axis=-2)
    return np.where(np.isnan(rho), 0.0, rho), informative, varies


def mean_lds(total: np.ndarray, count: np.ndarray, any_varies: np.ndarray) -> np.ndarray:
    """LDS from summed correlations and counts of informative tests; NaN where undefined.

    Parameters
    ----------
    total : (...) sum of :func:`per_test_rho`'s ``rho`` over the informative tests (and base runs).
    count : (...) number of informative tests summed.
    any_varies : (...) bool, whether the predictions vary for at least one test example.

    Returns
    -------
    lds : (...) ``total / count``; NaN where ``count`` is 0 or no prediction varies.
    """
    lds = np.full(np.shape(total), np.nan)
    np.divide(total, count, out=lds, where=(count > 0) & any_varies)
    return lds


def sign_agreement(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Fraction of draws where the mean-over-tests predicted change has the sign of the real one.

    Parameters
    ----------
    predicted, actual : (n_bases, n_draws, n_test) changes of the final loss.

    Returns
    -------
    agreement : in [0, 1], over the (base, draw) pairs.
    """
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        same_sign = np.sign(predicted.mean(axis=-1)) == np.sign(actual.mean(axis=-1))
    return float(same_sign.mean())


def magnitude_ratio(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean |predicted change| over mean |actual change|: 1 when the predictions have the real size.

    Parameters
    ----------
    predicted, actual : (n_bases, n_draws, n_test) changes of the final loss.

    Returns
    -------
    ratio : NaN when no real change is non-zero.
    """
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    real_size = float(np.abs(actual).mean())
    return float(np.abs(predicted).mean()) / real_size if real_size > 0 else float("nan")


def lds_scores(
    predicted: np.ndarray,
    actual: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """LDS with a bootstrap interval, sign agreement and magnitude ratio of predicted vs real changes.

    Parameters
    ----------
    predicted, actual : (n_bases, n_draws, n_test) change of each test example's final loss under each draw
        of each base run, against that base (predicted: simulated draw - simulated base; actual: retrained
        draw - retrained base).
    n_boot : bootstrap resamples (draws resampled with replacement within each base run; the same
        resamples for every call with the same shapes and seed, so methods are compared on paired resamples).
        0 skips the interval.
    seed : seed of the resamples.
    confidence : coverage of the interval.

    Returns
    -------
    scores : ``lds`` (mean over base runs and informative test examples of the per-test Spearman over
        draws), ``lds_low`` / ``lds_high`` (bootstrap interval, recentred on ``lds``), ``sign_agreement`` (fraction of
        (base, draw) pairs where the mean-over-tests predicted change has the sign of the real one),
        ``magnitude_ratio`` (mean |predicted change| / mean |actual change|). NaN where undefined.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 3:
        raise SimfluenceError(f"predicted and actual changes must both be (n_bases, n_draws, n_test), got "
                              f"{predicted.shape} and {actual.shape}")
    rho, informative, varies = per_test_rho(predicted, actual)
    lds = float(mean_lds((rho * informative).sum(), informative.sum(), np.asarray(varies.any())))
    low = high = float("nan")
    if n_boot > 0 and np.isfinite(lds):
        low, high = lds_bootstrap_interval(predicted, actual, lds, n_boot, seed, confidence)
    return {"lds": lds, "lds_low": low, "lds_high": high, "sign_agreement": sign_agreement(predicted, actual),
            "magnitude_ratio": magnitude_ratio(predicted, actual)}


def lds_bootstrap_interval(predicted: np.ndarray, actual: np.ndarray, lds: float, n_boot: int, seed: int,
                           confidence: float) -> tuple[float, float]:
    """Percentile interval of the LDS over resamples of the draws within each base run, recentred on ``lds``.

    Resampling with replacement repeats draws, and the ties pull a rank correlation down: the resampled scores
    sit below the score (for a good method the plain percentile interval misses it). The interval keeps their
    spread and moves their median onto ``lds`` (clipped to [-1, 1]).

    Parameters
    ----------
    predicted, actual : (n_bases, n_draws, n_test) changes of the final loss.
    lds : the LDS of all draws (the interval's centre).
    n_boot : resamples (``(n_bases, n_boot, n_draws)`` draw indices from ``seed``).
    seed : seed of the resamples.
    confidence : coverage of the interval.

    Returns
    -------
    low, high : the interval; NaN, NaN when no resample has a defined LDS.
    """
    n_bases, n_draws, n_test = predicted.shape
    rng = np.random.default_rng([int(seed), 7])
    resamples = rng.integers(0, n_draws, size=(n_bases, n_boot, n_draws))
    total, count = np.zeros(n_boot), np.zeros(n_boot)
    any_varies = np.zeros(n_boot, dtype=bool)
    chunk = max(1, 2_000_000 // max(1, n_draws * n_test))  # bounds memory: (chunk, n_draws, n_test) arrays
    for base in range(n_bases):
        for start in range(0, n_boot, chunk):
            index = resamples[base, start:start + chunk]
            rho, informative, varies = per_test_rho(predicted[base][index], actual[base][index])
            total[start:start + chunk] += (rho * informative).sum(axis=1)
            count[start:start + chunk] += informative.sum(axis=1)
            any_varies[start:start + chunk] |= varies.any(axis=1)
    values = mean_lds(total, count, any_varies)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - confidence)
    low, middle, high = np.percentile(values, [tail, 50.0, 100.0 - tail])
    return float(np.clip(low + lds - middle, -1.0, 1.0)), float(np.clip(high + lds - middle, -1.0, 1.0))
