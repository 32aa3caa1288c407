"""Exact leave-one-out for simulators with linear dynamics, for every pool example at once.

Removing pool example i from a curriculum changes only the steps where i appears. Each step of a
linear simulator (:mod:`simfluence.simulators.dynamics`) is an affine map of the state ``s = (L, v)``
(loss and velocity)::

    s_t = M_t s_{t-1} + c_t,    M_t = [[alpha_t, mu], [alpha_t - 1, mu]],    c_t = [beta_t, beta_t]

(with ``mu = 0`` this is ``L_t = alpha_t L_{t-1} + beta_t``). So the leave-one-out state is the base state
up to i's first occurrence, the edited map at each occurrence (:meth:`StepCoefficients.without`), and the
*unchanged* maps in between. The maps in between are composed from a table of maps over 1, 2, 4, ... steps
(binary lifting), so each example costs O(occurrences x log T) map compositions instead of a T-step rollout,
and no map is ever inverted: zero or negative alpha needs no special care (no division, no logarithm).

The result equals re-simulating every leave-one-out curriculum (to rounding), for the unclipped
dynamics: a simulator with a loss floor is compared with ``simulate(..., clip=False)``.
"""
from __future__ import annotations

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.simulators.dynamics import StepCoefficients, unroll

_CHUNK_BYTES = 256 * 2**20

def _maps(alpha: np.ndarray, beta: np.ndarray, momentum: float) -> np.ndarray:
    """Affine maps of the state (L, v) as a stack of components ``(m00, m01, m10, m11, c0, c1)``: (6, ...)."""
    return np.stack([alpha, np.full_like(alpha, momentum), alpha - 1.0, np.full_like(alpha, momentum), beta, beta])


def _compose(second: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The map ``second o first`` (apply ``first``, then ``second``), component-wise over any batch shape."""
    g00, g01, g10, g11, g0, g1 = second
    f00, f01, f10, f11, f0, f1 = first
    return np.stack([
        g00 * f00 + g01 * f10, g00 * f01 + g01 * f11,
        g10 * f00 + g11 * f10, g10 * f01 + g11 * f11,
        g00 * f0 + g01 * f1 + g0, g10 * f0 + g11 * f1 + g1,
    ])


def _apply(maps: np.ndarray, loss: np.ndarray, velocity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m00, m01, m10, m11, c0, c1 = maps
    return m00 * loss + m01 * velocity + c0, m10 * loss + m11 * velocity + c1


def _lifting_table(maps: np.ndarray) -> list[np.ndarray]:
    """Level j holds, for every start a, the map of steps a+1 .. a+2^j (valid where a + 2^j <= T): (6, T', n)."""
    table = [maps]
    n_steps = maps.shape[1]
    span = 1
    while 2 * span <= n_steps:
        prev = table[-1]
        count = n_steps - 2 * span + 1
        table.append(_compose(prev[:, span : span + count], prev[:, :count]))
        span *= 2
    return table


def _advance(
    table: list[np.ndarray], loss: np.ndarray, velocity: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the unchanged maps of steps start+1 .. start+length to each row of (loss, velocity): (n, n_test)."""
    position = start.copy()
    for level, maps in enumerate(table):
        take = np.flatnonzero((length >> level) & 1)
        if take.size:
            at = position[take]
            loss[take], velocity[take] = _apply(maps[:, at], loss[take], velocity[take])
            position[take] += 1 << level
    return loss, velocity


def exact_loo(
    coef: StepCoefficients, curriculum: Curriculum, initial_losses: np.ndarray, step: int | None = None
) -> np.ndarray:
    """Loss change at ``step`` when each pool example is removed from every batch it appears in.

    Parameters
    ----------
    coef : the base curriculum's coefficients (``LinearDynamics.step_coefficients``).
    curriculum : the base curriculum (T steps).
    initial_losses : (n_test,) losses at step 0.
    step : the step whose loss is compared (default T, the final step).

    Returns
    -------
    (n_pool, n_test) float64: loss without example i minus loss with it (positive: removing i would raise the
    loss, i.e. i helps); zero rows for examples absent from the curriculum.
    """
    n_steps = curriculum.n_steps
    step = n_steps if step is None else int(step)
    if not 0 <= step <= n_steps:
        raise SimfluenceError(f"step {step} outside 0..{n_steps}")
    n_pool, n_test = coef.add.shape[1], coef.add.shape[2]
    initial = np.asarray(initial_losses, dtype=np.float64).reshape(-1)
    if initial.shape != (n_test,):
        raise SimfluenceError(f"initial_losses has {initial.size} values for {n_test} test examples")
    effects = np.zeros((n_pool, n_test))
    if step == 0 or n_steps == 0:
        return effects

    counts = curriculum.to_csr(n_pool)[:step].tocsc()  # occurrences up to `step`, grouped by example
    counts.sum_duplicates()
    per_example = np.diff(counts.indptr)
    examples = np.flatnonzero(per_example)
    if examples.size == 0:
        return effects
    occ_step = counts.indices + 1  # 1-based step of every occurrence, sorted within each example
    occ_count = counts.data
    first = counts.indptr[examples]
    n_occ = per_example[examples]

    momentum = coef.momentum
    chunk = max(1, _CHUNK_BYTES // (8 * 6 * n_steps * max(1, int(np.log2(n_steps)) + 1)))
    for lo in range(0, n_test, chunk):  # chunks of test examples bound the lifting table's memory
        hi = min(n_test, lo + chunk)
        cols = slice(lo, hi)
        alpha, beta = coef.alpha[:, cols], coef.beta[:, cols]
        table = _lifting_table(_maps(alpha, beta, momentum))
        base_loss = unroll(alpha[None], beta[None], initial[None, cols], momentum)[0]  # (T + 1, n_chunk) unclipped
        base_velocity = np.zeros_like(base_loss)
        base_velocity[1:] = np.diff(base_loss, axis=0)

        start = occ_step[first] - 1
        loss, velocity = base_loss[start].copy(), base_velocity[start].copy()  # just before the first occurrence
        position = start.copy()
        for rank in range(int(n_occ.max())):  # occurrences in order; all examples at once
            live = np.flatnonzero(n_occ > rank)
            at = occ_step[first[live] + rank]
            gap = at - 1 - position[live]
            part_loss, part_velocity = _advance(table, loss[live], velocity[live], position[live], gap)
            edited_alpha, edited_beta = coef.without(examples[live], at, occ_count[first[live] + rank], cols)
            loss[live], velocity[live] = _apply(_maps(edited_alpha, edited_beta, momentum), part_loss, part_velocity)
            position[live] = at
        loss, velocity = _advance(table, loss, velocity, position, step - position)
        effects[examples, cols] = loss - base_loss[step]
    return effects
