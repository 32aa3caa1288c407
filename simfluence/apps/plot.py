"""Pictures of simulated vs real training runs: trajectories, final losses, error over steps, what-ifs.

This module reads results (the arrays of an :class:`~simfluence.evaluation.Evaluation` or a
:class:`~simfluence.counterfactual.WhatIf`) and draws; it never fits or rolls out anything. Every
function builds a :class:`matplotlib.figure.Figure` directly, without pyplot, so no global figure state
is created and no interactive backend is needed; PNGs are written atomically (temp file in the same
folder, then rename).

Conventions shared by every plot: ``predicted`` maps method names to ``(n_runs, T + 1, n_test)``
rolled-out losses, ``actual`` is ``(n_runs, T + 1, n_test)`` logged losses (NaN where not logged) and
``mask`` ``(n_runs, T + 1)`` says which steps each run logged (default: every non-NaN step). Index
``t`` along axis 1 is the loss after step ``t`` (0: before training). Each method keeps one colour in
every plot (:func:`method_styles`); the ``mean_curve`` baseline is grey and dashed. :func:`plot_whatif`
draws one rollout per scenario instead, ``(n_scenarios, T + 1, n_test)``, addressed by external test ids.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from simfluence._io import atomic_write_bytes
from simfluence.errors import SimfluenceError
from simfluence.ids import IdIndex
from simfluence.metrics import trajectory_metrics

if TYPE_CHECKING:
    from simfluence.counterfactual import WhatIf

DPI = 120
BASELINE = "mean_curve"
BASELINE_STYLE = {"color": "0.5", "linestyle": "--"}
ACTUAL_STYLE = {"color": "black", "marker": "o", "markersize": 2.5, "linewidth": 0.8, "label": "actual (logged)"}
LOG_SPAN = 50.0
REPORT_FILES = ("trajectories.png", "final_scatter.png", "error_over_steps.png")


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Line style per method: ``tab10`` colours but grey in the given order, the ``mean_curve`` baseline grey dashed.

    Parameters
    ----------
    methods : method names, in the order they are plotted.

    Returns
    -------
    styles : {method: keyword arguments for ``Axes.plot`` (``color``, ``linestyle``)}.
    """
    palette = [f"C{i}" for i in range(10) if i != 7]  # C7 is grey, the baseline's colour
    styles, position = {}, 0
    for name in methods:
        if name == BASELINE:
            styles[name] = dict(BASELINE_STYLE)
        else:
            styles[name] = {"color": palette[position % len(palette)], "linestyle": "-"}
            position += 1
    return styles


def _check_inputs(
    predicted: Mapping[str, np.ndarray], actual: np.ndarray, mask: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Arrays as floats with matching shapes and a boolean mask (default: where ``actual`` is finite)."""
    if not predicted:
        raise SimfluenceError("nothing to plot: no predicted trajectories")
    actual = np.asarray(actual, dtype=float)
    if actual.ndim != 3:
        raise SimfluenceError(f"actual must have shape (n_runs, T + 1, n_test), got shape {actual.shape}")
    arrays = {}
    for name, values in predicted.items():
        values = np.asarray(values, dtype=float)
        if values.shape != actual.shape:
            raise SimfluenceError(f"predicted[{name!r}] has shape {values.shape} but actual has {actual.shape}")
        arrays[name] = values
    if mask is None:
        mask = np.isfinite(actual).all(axis=2)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != actual.shape[:2]:
        raise SimfluenceError(f"mask must have shape (n_runs, T + 1) = {actual.shape[:2]}, got {mask.shape}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise SimfluenceError(f"run(s) {empty.tolist()} logged no step; nothing to compare")
    return arrays, actual, mask


def _final_steps(mask: np.ndarray) -> np.ndarray:
    """(n_runs,) index of each run's last logged step."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def _grid(n_panels: int, max_cols: int) -> tuple[int, int]:
    """(rows, cols) for ``n_panels`` small panels, at most ``max_cols`` per row."""
    cols = min(n_panels, max_cols)
    return -(-n_panels // cols), cols


def _log_scale_if_wide(ax: Axes, actual: np.ndarray, predicted: Sequence[np.ndarray]) -> None:
    """Give ``ax`` a log y-axis when the logged losses are positive and span more than ``LOG_SPAN``x.

    The limits cover the logged losses and the positive predictions, but reach at most 20x below the
    smallest logged loss, so a prediction that collapses towards (or below) zero runs off the bottom of the
    panel instead of squashing the real curve.
    """
    actual = actual[np.isfinite(actual)]
    if actual.size == 0 or actual.min() <= 0 or actual.max() / actual.min() <= LOG_SPAN:
        return
    shown = np.concatenate([actual, *(values[np.isfinite(values) & (values > 0)] for values in predicted)])
    ax.set_yscale("log")
    ax.set_ylim(max(shown.min(), actual.min() / 20) / 1.3, shown.max() * 1.3)


def informative_tests(actual: np.ndarray, mask: np.ndarray, run: int, count: int) -> list[int]:
    """Test examples that show a run's range of behaviour: evenly spaced in the order of their loss change.

    Test examples are sorted by ``L_final - L_0`` in ``run`` (largest drop first, ties by index) and
    ``count`` are taken at evenly spaced positions, so the largest drop and the smallest drop (or largest
    rise) are always shown, with typical ones in between. Deterministic.

    Parameters
    ----------
    actual : (n_runs, T + 1, n_test) logged losses.
    mask : (n_runs, T + 1) True where logged.
    run : row of the run.
    count : number of test examples wanted (all if there are fewer).

    Returns
    -------
    tests : column indices, in the order of their loss change.
    """
    logged = np.flatnonzero(mask[run])
    change = actual[run, logged[-1]] - actual[run, logged[0]]
    change = np.where(np.isfinite(change), change, 0.0)
    order = np.argsort(change, kind="stable")
    if count >= order.size:
        return order.tolist()
    positions = np.round(np.linspace(0, order.size - 1, count)).astype(int)
    return order[positions].tolist()


def _shorten(label: Any, width: int = 36) -> str:
    """A label cut to ``width`` characters by an ellipsis in the middle (ids often differ at the end)."""
    text = " ".join(str(label).split())
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def plot_trajectories(
    predicted: Mapping[str, np.ndarray],
    actual: np.ndarray,
    mask: np.ndarray | None = None,
    run: int = 0,
    tests: Sequence[int] | None = None,
    test_labels: Sequence | None = None,
    run_label: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Real vs simulated loss curves of one held-out run, one small panel per test example.

    Parameters
    ----------
    predicted : {method: (n_runs, T + 1, n_test)} simulated losses.
    actual : (n_runs, T + 1, n_test) logged losses, NaN where not logged.
    mask : (n_runs, T + 1) True where logged; default where ``actual`` is finite.
    run : row of the run to show.
    tests : column indices of the test examples to show; default 6 chosen by :func:`informative_tests`.
    test_labels : (n_test,) names for the panel titles ("test <label>"); default the column index.
    run_label : name of the run for the figure title; default ``"run <run>"``.
    path : optional PNG file to write.

    Returns
    -------
    fig : one panel per test example (black dots: logged losses; a line per method up to the run's last
        logged step), one legend for the figure. A panel whose losses span more than 50x uses a log y-axis.
    """
    predicted, actual, mask = _check_inputs(predicted, actual, mask)
    n_runs, _, n_test = actual.shape
    if not -n_runs <= run < n_runs:
        raise SimfluenceError(f"run {run} is out of range for {n_runs} run(s)")
    run = run % n_runs
    if tests is None:
        tests = informative_tests(actual, mask, run, 6)
    tests = [int(test) for test in tests]
    bad = [test for test in tests if not 0 <= test < n_test]
    if bad or not tests:
        raise SimfluenceError(f"tests must be a non-empty list of columns in 0..{n_test - 1}, got {tests}")
    if test_labels is not None and len(test_labels) != n_test:
        raise SimfluenceError(f"test_labels has {len(test_labels)} entries for {n_test} test examples")

    logged = np.flatnonzero(mask[run])
    steps = np.arange(logged[-1] + 1)
    styles = method_styles(list(predicted))
    rows, cols = _grid(len(tests), 2 if len(tests) == 4 else 3)
    fig = Figure(figsize=(11, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, test in zip(axes.flat, tests, strict=False):
        for name, values in predicted.items():
            ax.plot(steps, values[run, steps, test], linewidth=1.6, label=name, **styles[name])
        ax.plot(logged, actual[run, logged, test], zorder=3, **ACTUAL_STYLE)
        _log_scale_if_wide(ax, actual[run, logged, test], [values[run, steps, test] for values in predicted.values()])
        label = test_labels[test] if test_labels is not None else test
        ax.set_title(f"test {_shorten(label)}", fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(tests):]:
        ax.set_visible(False)
    for position, ax in enumerate(axes.flat[: len(tests)]):
        if position + cols >= len(tests):  # nothing visible below it
            ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("test loss")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    fig.suptitle(f"Simulated vs real test loss, held-out {run_label or f'run {run}'}")
    _save(fig, path)
    return fig


def _square_limits(values: np.ndarray, log: bool) -> tuple[bool, tuple[float, float]]:
    """Whether a scatter panel is log-log, and its (low, high) limits for both axes.

    Parameters
    ----------
    values : (n,) every coordinate the panel plots (x and y together); non-finite ones are ignored.
    log : whether log axes are wanted; granted only when every finite value is positive.

    Returns
    -------
    log : the scale to use.
    limits : (low, high), padded by a factor 1.3 on log axes or 5 % of the range on linear ones.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return False, (0.0, 1.0)
    if log and values.min() > 0:
        return True, (float(values.min()) / 1.3, float(values.max()) * 1.3)
    pad = 0.05 * (float(values.max() - values.min()) or max(abs(float(values.max())), 1.0))
    return False, (float(values.min()) - pad, float(values.max()) + pad)


def _plain_log_labels(ax: Axes, span: float) -> None:
    """Plain-number tick labels (``0.2``, ``1``, ``50``) on both log axes of a square scatter panel.

    A panel spanning less than 100x also labels some minor ticks (at 2 and 5 times a power of ten; below
    8x at 2, 3, 4, 5, 6 and 8 times), so that a narrow panel is not left with one label or none.
    """
    labelled = (2, 3, 4, 5, 6, 8) if span < 8 else (2, 5) if span < 100 else ()

    def plain(value: float, _position: int) -> str:
        return f"{value:g}"

    def minor(value: float, _position: int) -> str:
        mantissa = int(np.round(value / 10.0 ** np.floor(np.log10(value) + 1e-9)))
        return f"{value:g}" if mantissa in labelled else ""

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(plain))
        axis.set_minor_formatter(FuncFormatter(minor))


def plot_final_scatter(
    predicted: Mapping[str, np.ndarray],
    actual: np.ndarray,
    mask: np.ndarray | None = None,
    log: bool = True,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Predicted vs actual final loss, every (held-out run, test example) a point, one panel per method.

    Parameters
    ----------
    predicted : {method: (n_runs, T + 1, n_test)} simulated losses.
    actual : (n_runs, T + 1, n_test) logged losses, NaN where not logged.
    mask : (n_runs, T + 1) True where logged; default where ``actual`` is finite. A run's final loss is
        the one at its last logged step.
    log : log-log axes for each panel whose plotted values are all positive (the others stay linear).
    path : optional PNG file to write.

    Returns
    -------
    fig : one panel per method with the y = x diagonal; each panel has its own square limits covering
        its points (the same range on both axes), so one method's outliers do not squash another's
        points into a corner. Each title gives the method, its final-step MSE and ``rho_final``
        (Spearman across test examples, averaged over runs), the same numbers as
        :func:`simfluence.metrics.trajectory_metrics`.
    """
    predicted, actual, mask = _check_inputs(predicted, actual, mask)
    take = _final_steps(mask)[:, None, None]
    actual_final = np.take_along_axis(actual, take, axis=1)[:, 0]
    finals = {name: np.take_along_axis(values, take, axis=1)[:, 0] for name, values in predicted.items()}

    styles = method_styles(list(predicted))
    cols = len(predicted) if len(predicted) <= 3 else int(np.ceil(np.sqrt(len(predicted))))
    rows, cols = _grid(len(predicted), cols)
    fig = Figure(figsize=(3.6 * cols + 0.5, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, values) in zip(axes.flat, finals.items(), strict=False):
        scores = trajectory_metrics(predicted[name], actual, mask=mask)
        panel_log, (low, high) = _square_limits(np.concatenate([actual_final.ravel(), values.ravel()]), log)
        ax.plot([low, high], [low, high], color="0.6", linewidth=1, linestyle=":", zorder=1)
        point_style = {"s": 9, "alpha": 0.5, "color": styles[name]["color"], "edgecolors": "none"}
        ax.scatter(actual_final.ravel(), values.ravel(), zorder=2, **point_style)
        if panel_log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_labels(ax, high / low)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_title(f"{name}\nMSE {scores['final_mse']:.3g}, Spearman \u03c1 {scores['rho_final']:.3f}", fontsize=10)
        ax.set_xlabel("actual final loss")
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(finals):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted final loss")
    n_runs, _, n_test = actual.shape
    fig.suptitle(f"Final test loss on held-out runs ({n_runs} runs \u00d7 {n_test} test examples)")
    _save(fig, path)
    return fig


def error_over_steps(
    predicted: Mapping[str, np.ndarray], actual: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Mean squared error per step, over the runs that logged it and every test example.

    Returns
    -------
    mse : {method: (T + 1,)} NaN at steps no run logged (or where an error is not finite).
    """
    counts = mask.sum(axis=0) * actual.shape[2]
    out = {}
    with np.errstate(invalid="ignore", over="ignore"):
        for name, values in predicted.items():
            squared = np.where(mask[:, :, None], (values - actual) ** 2, 0.0).sum(axis=(0, 2))
            out[name] = np.divide(squared, counts, out=np.full(squared.shape, np.nan), where=counts > 0)
    return out


def plot_error_over_steps(
    predicted: Mapping[str, np.ndarray],
    actual: np.ndarray,
    mask: np.ndarray | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Mean squared error of each method at every logged step (log y-axis), one line per method.

    Parameters
    ----------
    predicted : {method: (n_runs, T + 1, n_test)} simulated losses.
    actual : (n_runs, T + 1, n_test) logged losses, NaN where not logged.
    mask : (n_runs, T + 1) True where logged; default where ``actual`` is finite.
    path : optional PNG file to write.

    Returns
    -------
    fig : one axes; the error at step ``t`` averages over the runs that logged ``t`` and all test examples.
        Step 0 (the observed start of every rollout, error 0) is left out.
    """
    predicted, actual, mask = _check_inputs(predicted, actual, mask)
    mse = error_over_steps(predicted, actual, mask)
    steps = np.arange(1, actual.shape[1])
    keep = mask[:, 1:].any(axis=0)
    styles = method_styles(list(predicted))
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    marker = "." if keep.sum() < 40 else None
    for name, values in mse.items():
        ax.plot(steps[keep], values[1:][keep], linewidth=1.8, label=name, marker=marker, **styles[name])
    positive = np.concatenate([values[1:][keep] for values in mse.values()])
    if np.any(np.isfinite(positive) & (positive > 0)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"Error of simulated test loss over training ({actual.shape[0]} held-out runs)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    _save(fig, path)
    return fig


def plot_report(evaluation: Any, out_dir: str | os.PathLike, test_labels: Sequence | None = None) -> dict[str, Path]:
    """Write the three standard pictures of an evaluation into ``out_dir`` (created if missing).

    Parameters
    ----------
    evaluation : a :class:`~simfluence.evaluation.Evaluation` with ``predicted``, ``actual`` and ``mask``.
    out_dir : folder for ``trajectories.png``, ``final_scatter.png`` and ``error_over_steps.png``.
    test_labels : (n_test,) names of the test examples (e.g. ``runset.test_ids``) for panel titles.

    Returns
    -------
    paths : {"trajectories", "final_scatter", "error_over_steps": path of the PNG}.
    """
    if evaluation.actual is None or not evaluation.predicted:
        raise SimfluenceError("the evaluation holds no trajectories to plot (was it run with any method?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {Path(name).stem: out_dir / name for name in REPORT_FILES}
    predicted, actual, mask = evaluation.predicted, evaluation.actual, evaluation.mask
    run_label = evaluation.heldout_runs[0] if evaluation.heldout_runs else None
    plot_trajectories(predicted, actual, mask, test_labels=test_labels, run_label=run_label, path=paths["trajectories"])
    plot_final_scatter(predicted, actual, mask, path=paths["final_scatter"])
    plot_error_over_steps(predicted, actual, mask, path=paths["error_over_steps"])
    return paths


def plot_verification(
    names: Sequence[str],
    predicted: np.ndarray,
    actual: np.ndarray,
    tests: Sequence[int] = (),
    path: str | os.PathLike | None = None,
) -> Figure:
    """Predicted vs actual change of every test example's final loss, one panel per counterfactual edit.

    Each panel has its own symmetric scale, so one large edit does not flatten the others.

    Parameters
    ----------
    names : (n_curricula,) curriculum names, the base first (the change is measured against it).
    predicted, actual : (n_curricula, T + 1, n_test) simulated and retrained trajectories.
    tests : target test positions, drawn in red.
    path : optional PNG file to write.
    """
    pred_change = predicted[1:, -1] - predicted[:1, -1]
    act_change = actual[1:, -1] - actual[:1, -1]
    n_panels = len(names) - 1
    rows, cols = _grid(n_panels, 3)
    fig = Figure(figsize=(4.0 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    targets = np.zeros(predicted.shape[2], dtype=bool)
    targets[list(tests)] = True
    for index, ax in enumerate(axes):
        if index >= n_panels:
            ax.set_visible(False)
            continue
        both = np.abs(np.concatenate([pred_change[index], act_change[index]]))
        both = both[np.isfinite(both)]
        limit = float(both.max()) * 1.05 if both.size and both.max() > 0 else 1.0
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        ax.plot([-limit, limit], [-limit, limit], color="0.5", lw=0.8, ls="--")
        ax.scatter(act_change[index, ~targets], pred_change[index, ~targets], s=10, color="tab:blue", alpha=0.6,
                   label="other tests")
        ax.scatter(act_change[index, targets], pred_change[index, targets], s=18, color="tab:red", label="targets")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_title(str(names[index + 1]), fontsize=10)
        ax.set_xlabel("actual change of final loss")
        ax.set_ylabel("predicted change")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Counterfactual curricula: predicted vs retrained (change against the base curriculum)")
    _save(fig, path)
    return fig


def plot_whatif(
    whatif: WhatIf,
    tests: Sequence | None = None,
    actual: np.ndarray | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Predicted loss trajectories of every what-if scenario, one small panel per test example.

    Parameters
    ----------
    whatif : a :class:`~simfluence.counterfactual.WhatIf` result: ``names`` (n_scenarios,) with ``"base"``
        first, ``trajectories`` (n_scenarios, T + 1, n_test) predicted losses, ``test_ids`` (n_test,)
        external test ids (empty: column positions serve as ids).
    tests : external test ids to show; default the (up to) 6 whose predicted final loss changes most
        against the base in any scenario, largest change first.
    actual : (T_base + 1, n_test) logged losses of the base run (T_base <= T), drawn as dots; NaN where
        not logged.
    path : optional PNG file to write.

    Returns
    -------
    fig : one panel per test example with a line per scenario (the base black and solid), one legend for
        the figure. A panel whose losses span more than 50x uses a log y-axis.
    """
    trajectories = np.asarray(whatif.trajectories, dtype=float)
    names = [str(name) for name in whatif.names]
    if trajectories.ndim != 3 or trajectories.shape[0] == 0:
        raise SimfluenceError(f"what-if trajectories must have shape (n_scenarios, T + 1, n_test), got "
                              f"{trajectories.shape}")
    if len(names) != trajectories.shape[0]:
        raise SimfluenceError(f"what-if result names {len(names)} scenario(s) but holds {trajectories.shape[0]}")
    n_test = trajectories.shape[2]
    test_ids = list(whatif.test_ids) if len(whatif.test_ids) else list(range(n_test))
    if len(test_ids) != n_test:
        raise SimfluenceError(f"what-if result has {len(test_ids)} test ids for {n_test} test examples")
    if actual is not None:
        actual = np.asarray(actual, dtype=float)
        if actual.ndim != 2 or actual.shape[1] != n_test or actual.shape[0] > trajectories.shape[1]:
            raise SimfluenceError(f"actual must have shape (at most {trajectories.shape[1]} steps, {n_test} tests), "
                                  f"got {actual.shape}")
    if tests is None:
        change = np.abs(np.asarray(whatif.change, dtype=float)[:, -1])
        change = np.where(np.isfinite(change), change, 0.0).max(axis=0)
        columns = np.argsort(-change, kind="stable")[:6]
    else:
        columns = IdIndex(test_ids, "test").positions(tests)
    if columns.size == 0:
        raise SimfluenceError("no test example to plot")

    steps = np.arange(trajectories.shape[1])
    styles = {**method_styles(names[1:]), names[0]: {"color": "black", "linestyle": "-"}}
    rows, cols = _grid(columns.size, 2 if columns.size == 4 else 3)
    fig = Figure(figsize=(11, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        for index, name in enumerate(names):
            ax.plot(steps, trajectories[index, :, column], linewidth=2.0 if index == 0 else 1.4, label=name,
                    zorder=3 if index == 0 else 2, **styles[name])
        reference = trajectories[0, :, column]
        if actual is not None:
            logged = np.flatnonzero(np.isfinite(actual[:, column]))
            ax.plot(logged, actual[logged, column], color="black", marker="o", markersize=3, linestyle="none",
                    label="actual (base, logged)", zorder=4)
            reference = actual[logged, column]
        _log_scale_if_wide(ax, reference, list(trajectories[:, :, column]))
        ax.set_title(f"test {_shorten(test_ids[column])}", fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[columns.size:]:
        ax.set_visible(False)
    for position, ax in enumerate(axes.flat[: columns.size]):
        if position + cols >= columns.size:  # nothing visible below it
            ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted test loss")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    fig.suptitle(f"Predicted test loss under {len(names) - 1} what-if scenario(s) against {names[0]!r}")
    _save(fig, path)
    return fig


def _robust_limit(values: np.ndarray) -> float:
    """Half-width of a symmetric axis covering 99.5% of the finite ``|values|`` (1.0 when all are 0 or missing)."""
    magnitudes = np.abs(values[np.isfinite(values)])
    if magnitudes.size == 0:
        return 1.0
    limit = float(np.percentile(magnitudes, 99.5)) * 1.1
    return limit if limit > 0 else 1.0


def plot_lds(
    predicted: Mapping[str, np.ndarray],
    actual: np.ndarray,
    protocol: str = "",
    scores: Mapping[str, float] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Predicted vs real change of the final loss under the LDS draws of one protocol, one panel per method.

    Small points are (base run, draw, test example) triples, coloured by base run; large points are each
    draw's mean over test examples (what the sign agreement scores). Each axis has its own symmetric scale
    (covering 99.5% of its points), so a method whose changes are too small or too large still shows its
    ranking; the dashed line is predicted = actual.

    Parameters
    ----------
    predicted : {method: (n_bases, n_draws, n_test) predicted change of the final loss}.
    actual : (n_bases, n_draws, n_test) real change (retrained draw - retrained base).
    protocol : the protocol's name, for the title.
    scores : optional {method: LDS} shown in the panel titles.
    path : optional PNG file to write.
    """
    actual = np.asarray(actual, dtype=float)
    if not predicted:
        raise SimfluenceError("nothing to plot: no predicted changes")
    if actual.ndim != 3:
        raise SimfluenceError(f"actual changes must have shape (n_bases, n_draws, n_test), got {actual.shape}")
    arrays = {}
    for name, values in predicted.items():
        values = np.asarray(values, dtype=float)
        if values.shape != actual.shape:
            raise SimfluenceError(f"predicted[{name!r}] has shape {values.shape} but actual has {actual.shape}")
        arrays[name] = values
    scores = {} if scores is None else dict(scores)
    rows, cols = _grid(len(arrays), 3)
    fig = Figure(figsize=(4.0 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x_limit = _robust_limit(actual)
    with np.errstate(invalid="ignore"):
        actual_mean = actual.mean(axis=2)
    for ax in axes[len(arrays):]:
        ax.set_visible(False)
    for ax, (name, values) in zip(axes, arrays.items(), strict=False):
        y_limit = _robust_limit(values)
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        reach = max(x_limit, y_limit)
        ax.plot([-reach, reach], [-reach, reach], color="0.5", lw=0.8, ls="--")
        with np.errstate(invalid="ignore"):
            predicted_mean = values.mean(axis=2)
        for base in range(actual.shape[0]):
            colour = f"C{base % 10}"
            ax.scatter(actual[base].ravel(), values[base].ravel(), s=5, color=colour, alpha=0.35, linewidths=0)
            ax.scatter(actual_mean[base], predicted_mean[base], s=18, color=colour, edgecolors="black",
                       linewidths=0.5, zorder=3)
        ax.set_xlim(-x_limit, x_limit)
        ax.set_ylim(-y_limit, y_limit)
        score = scores.get(name)
        shown = "n/a" if score is None or not np.isfinite(score) else f"{score:.3f}"
        ax.set_title(f"{name} (LDS {shown})", fontsize=10)
        ax.set_xlabel("actual change of final loss")
        ax.set_ylabel("predicted change")
        ax.grid(alpha=0.3)
    title = "LDS draws" + (f" ({protocol})" if protocol else "")
    fig.suptitle(f"{title}: predicted vs retrained change of each test example's final loss\n"
                 "(colour: base run; large points: a draw's mean over test examples)", fontsize=10)
    _save(fig, path)
    return fig
