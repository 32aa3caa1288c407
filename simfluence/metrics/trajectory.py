"""Trajectory metrics: how well simulated loss curves match real ones on held-out runs.

A simulator is judged by rolling it out from the observed initial losses of runs it never saw in
fitting or calibration and comparing the predicted trajectories with the logged ones:

- ``all_mse`` / ``all_mae``: squared / absolute error over every logged step after step 0;
- ``final_mse``: squared error at each run's final logged step;
- ``rho_final``: Spearman rho across test examples of the final losses, averaged over runs (the
  Simfluence paper's metric);
- ``rho_delta``: the same for the loss *change* ``L_final - L_0``;
- ``rho_runs``: Spearman rho across runs of the final loss of one test example, averaged over test
  examples.

``rho_final`` is dominated by how hard each test example is: a predictor that only knows which
examples start (and stay) hard scores well without knowing anything about curricula. ``rho_delta``
removes the per-example starting point and ``rho_runs`` asks the question attribution is for: does
the simulator rank curricula right for a given test example?

Every metric is a python float; a metric that is undefined (no logged steps, every rho on constant
input) is NaN, computed without RuntimeWarnings.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

METRIC_NAMES = ("all_mse", "all_mae", "final_mse", "rho_final", "rho_delta", "rho_runs")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, tied values sharing their average rank.

    Parameters
    ----------
    values : (..., n) array without NaN (NaNs each get their own rank; callers mask them).

    Returns
    -------
    ranks : (..., n) float array.
    """
    n = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    positions = np.broadcast_to(np.arange(n), values.shape)
    differs = ordered[..., 1:] != ordered[..., :-1]
    edge = np.ones(values.shape[:-1] + (1,), dtype=bool)
    starts_group = np.concatenate([edge, differs], axis=-1)
    ends_group = np.concatenate([differs, edge], axis=-1)
    first = np.maximum.accumulate(np.where(starts_group, positions, 0), axis=-1)
    last = np.minimum.accumulate(np.where(ends_group, positions, n)[..., ::-1], axis=-1)[..., ::-1]
    ranks = np.empty(values.shape, dtype=float)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rank correlation of ``x`` and ``y`` along ``axis``, ties getting average ranks.

    Parameters
    ----------
    x, y : arrays of the same shape (..., n, ...), ``n`` along ``axis``.
    axis : axis to correlate along.

    Returns
    -------
    rho : float array of the input shape with ``axis`` removed (a 0-d array for 1-d input). NaN, without a
        warning, where either input is constant along ``axis``, contains NaN, or ``n < 2``.

    Raises
    ------
    ValueError
        If ``x`` and ``y`` differ in shape or ``axis`` is out of range.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"spearman: x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim == 0:
        raise ValueError("spearman: inputs must have at least one dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"spearman: axis {axis} is out of range for {x.ndim}-d input")
    x = np.moveaxis(x, axis, -1)
    y = np.moveaxis(y, axis, -1)
    out_shape = x.shape[:-1]
    if x.shape[-1] < 2:
        return np.full(out_shape, np.nan)
    rank_x = _average_ranks(x)
    rank_y = _average_ranks(y)
    dev_x = rank_x - rank_x.mean(axis=-1, keepdims=True)
    dev_y = rank_y - rank_y.mean(axis=-1, keepdims=True)
    covariance = (dev_x * dev_y).sum(axis=-1)
    scale = np.sqrt((dev_x**2).sum(axis=-1) * (dev_y**2).sum(axis=-1))
    defined = (scale > 0) & ~np.isnan(x).any(axis=-1) & ~np.isnan(y).any(axis=-1)
    rho = np.full(out_shape, np.nan)
    np.divide(covariance, scale, out=rho, where=defined)
    return np.clip(rho, -1.0, 1.0)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    finite = ~np.isnan(values)
    count = int(finite.sum())
    return float(values[finite].sum() / count) if count else float("nan")


def _masked_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Mean of ``values`` where ``weights`` is True (values elsewhere, even NaN, ignored); NaN if none."""
    count = int(weights.sum())
    return float(np.where(weights, values, 0.0).sum() / count) if count else float("nan")


def trajectory_metrics(
    predicted: np.ndarray,
    actual: np.ndarray,
    initial: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Score predicted loss trajectories against actual ones (see the module docstring).

    Parameters
    ----------
    predicted, actual : (n_runs, n_steps + 1, n_test) losses; index 0 along axis 1 is step 0 (before
        training).
    initial : (n_runs, n_test) observed initial losses, the origin of ``rho_delta``; default
        ``actual[:, 0]``.
    mask : (n_runs, n_steps + 1) bool, which steps were logged in each run; default all. Losses at
        unlogged steps are ignored (they may be NaN). A run's final step is its last logged step.

    Returns
    -------
    metrics : {name: float} for every name in ``METRIC_NAMES``:
        ``all_mse`` / ``all_mae``: mean over (run, logged step >= 1, test) of squared / absolute error;
        ``final_mse``: mean over (run, test) of squared error at each run's final logged step;
        ``rho_final``: Spearman across test examples of predicted vs actual final loss, NaN-mean over runs;
        ``rho_delta``: the same for ``final - initial`` (both sides use the observed ``initial``);
        ``rho_runs``: Spearman across runs of predicted vs actual final loss, NaN-mean over test examples.
        NaN where undefined (no logged step >= 1, every rho on constant input, a single run, ...).

    Raises
    ------
    ValueError
        On inputs of the wrong dimensionality or mismatched shapes, or a run with no logged step.
    """
    predicted = np.asarray(predicted, dtype=float)
    actual = np.asarray(actual, dtype=float)
    if predicted.ndim != 3:
        raise ValueError(
            f"predicted must have shape (n_runs, n_steps + 1, n_test), got {predicted.ndim}-d shape "
            f"{predicted.shape}"
        )
    if actual.shape != predicted.shape:
        raise ValueError(f"actual has shape {actual.shape} but predicted has shape {predicted.shape}")
    n_runs, n_points, n_test = predicted.shape
    if n_points < 1:
        raise ValueError("trajectories must contain at least step 0 (axis 1 has length 0)")

    if initial is None:
        initial = actual[:, 0]
    initial = np.asarray(initial, dtype=float)
    if initial.shape != (n_runs, n_test):
        raise ValueError(
            f"initial must have shape (n_runs, n_test) = {(n_runs, n_test)}, got {initial.shape}"
        )

    if mask is None:
        mask = np.ones((n_runs, n_points), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n_runs, n_points):
        raise ValueError(
            f"mask must have shape (n_runs, n_steps + 1) = {(n_runs, n_points)}, got {mask.shape}"
        )
    unlogged = np.flatnonzero(~mask.any(axis=1))
    if unlogged.size:
        raise ValueError(
            f"mask marks no logged step in run(s) {unlogged.tolist()}; their final step is undefined"
        )

    final_step = n_points - 1 - np.argmax(mask[:, ::-1], axis=1)
    take = final_step[:, None, None]
    predicted_final = np.take_along_axis(predicted, take, axis=1)[:, 0]
    actual_final = np.take_along_axis(actual, take, axis=1)[:, 0]

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        error = predicted[:, 1:] - actual[:, 1:]
        logged = np.broadcast_to(mask[:, 1:, None], error.shape)
        final_error = predicted_final - actual_final
        return {
            "all_mse": _masked_mean(error**2, logged),
            "all_mae": _masked_mean(np.abs(error), logged),
            "final_mse": _masked_mean(final_error**2, np.ones(final_error.shape, dtype=bool)),
            "rho_final": _nanmean(spearman(predicted_final, actual_final, axis=1)),
            "rho_delta": _nanmean(spearman(predicted_final - initial, actual_final - initial, axis=1)),
            "rho_runs": _nanmean(spearman(predicted_final, actual_final, axis=0)),
        }


def bootstrap_intervals(
    predicted: np.ndarray,
    actual: np.ndarray,
    initial: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every :func:`trajectory_metrics` metric over the held-out runs.

    The runs are resampled with replacement (``n_boot`` times, seeded), the metrics recomputed on each
    resample; the interval says how much the scores depend on which runs happened to be held out. Resampled
    runs repeat, so ``rho_runs`` (a correlation across runs) is computed with ties; it is NaN-free only with
    at least two distinct runs in a resample.

    Parameters
    ----------
    predicted, actual, initial, mask : as for :func:`trajectory_metrics`, (n_runs, n_steps + 1, n_test) etc.
    n_boot : resamples (>= 1).
    seed : seed of the resamples (the same resamples for every method with the same number of runs, so
        methods are compared on paired resamples).
    confidence : coverage of the interval.

    Returns
    -------
    intervals : {metric: (low, high)} for every name in ``METRIC_NAMES``; (NaN, NaN) where no resample gives
        a finite value.
    """
    predicted = np.asarray(predicted, dtype=float)
    actual = np.asarray(actual, dtype=float)
    n_runs = predicted.shape[0] if predicted.ndim == 3 else 0
    if n_boot < 1 or n_runs < 1:
        raise ValueError(f"a bootstrap needs n_boot >= 1 and at least one run, got {n_boot} and {n_runs}")
    initial = actual[:, 0] if initial is None else np.asarray(initial, dtype=float)
    mask = np.ones(predicted.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    # every metric but rho_runs is a (weighted) mean over runs of per-run values: resample those
    per_run = [trajectory_metrics(predicted[r:r + 1], actual[r:r + 1], initial[r:r + 1], mask[r:r + 1])
               for r in range(n_runs)]
    counts = mask[:, 1:].sum(axis=1) * predicted.shape[2]  # (run, logged step >= 1, test) entries per run
    column = {name: np.array([scores[name] for scores in per_run]) for name in METRIC_NAMES}
    rng = np.random.default_rng([int(seed), n_runs])
    resamples = rng.integers(0, n_runs, size=(n_boot, n_runs))
    values: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for name in ("all_mse", "all_mae"):
            weighted = np.where(counts > 0, column[name] * counts, 0.0)
            values[name] = weighted[resamples].sum(axis=1) / counts[resamples].sum(axis=1)
        values["final_mse"] = column["final_mse"][resamples].mean(axis=1)
        for name in ("rho_final", "rho_delta"):
            values[name] = _nanmean_rows(column[name][resamples])
        final_step = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        predicted_final = predicted[np.arange(n_runs), final_step]  # (n_runs, n_test)
        actual_final = actual[np.arange(n_runs), final_step]
        chunk = max(1, 2_000_000 // max(1, predicted_final.size))
        values["rho_runs"] = np.concatenate([
            _nanmean_rows(spearman(predicted_final[rows], actual_final[rows], axis=1))
            for rows in np.array_split(resamples, range(chunk, n_boot, chunk))])
    tail = 50.0 * (1.0 - confidence)
    intervals = {}
    for name in METRIC_NAMES:
        finite = values[name][np.isfinite(values[name])]
        low, high = np.percentile(finite, [tail, 100.0 - tail]) if finite.size else (np.nan, np.nan)
        intervals[name] = (float(low), float(high))
    return intervals


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of the non-NaN entries of each row of a 2-d array; NaN (without a warning) for an all-NaN row."""
    finite = ~np.isnan(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(len(values), np.nan), where=count > 0)


def _format_cell(value: object) -> str:
    """One table cell: 4 significant digits for numbers, "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
        return "nan" if np.isnan(number) else f"{number:.4g}"
    return str(value)


def format_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Iterable[str] = METRIC_NAMES + ("fit_seconds",),
) -> str:
    """Render ``{method: {metric: value}}`` as a fixed-width plain-text table.

    Parameters
    ----------
    results : one row per method, in the mapping's order; each maps metric names to values.
    columns : metric columns, in order, after the leading ``method`` column.

    Returns
    -------
    table : header line, a rule, one line per method (no trailing newline). Numbers have 4 significant
        digits, NaN shows as ``nan`` and a metric a method lacks as ``-``.
    """
    columns = tuple(columns)
    header = ("method",) + columns
    rows = [
        (str(method),) + tuple(_format_cell(metrics.get(name)) for name in columns)
        for method, metrics in results.items()
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        numbers = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *numbers]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(row) for row in rows)])


def format_markdown_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Iterable[str] = METRIC_NAMES + ("fit_seconds",),
) -> str:
    """The same table as :func:`format_table`, as a GitHub-flavoured markdown table."""
    columns = tuple(columns)
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, metrics in results.items():
        lines.append(f"| {method} | " + " | ".join(_format_cell(metrics.get(name)) for name in columns) + " |")
    return "\n".join(lines)
