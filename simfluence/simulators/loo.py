"""Exact leave-one-out for simulators with linear dynamics, for every pool example at once.

Removing pool example i from a curriculum changes only the steps where i appears. Each step of a
linear simulator (:mod:`simfluence.simulators.dynamics`) is an affine map of the state ``s = (L, v)``
(loss and velocity)::

    s_t = M_t s_{t-1} + c_t,    M_t = [[alpha_t, mu], [alpha_t - 1, mu]],    c_t = [beta_t, beta_t]

The method follows the *deviation* ``d_t = s'_t - s_t`` of the leave-one-out state from the base state. At a
step without i it moves with the base's linear part alone, ``d_t = M_t d_{t-1}``; at a step with i (edited
coefficients ``alpha'_t, beta'_t`` from :meth:`StepCoefficients.without`, edited map ``M'_t``) it jumps::

    d_t = M'_t d_{t-1} + g_t (1, 1),    g_t = (alpha'_t - alpha_t) L_{t-1} + (beta'_t - beta_t)

with ``L`` the base loss. So for an example with occurrences ``t_1 < ... < t_k`` up to ``step``::

    d_{t_1} = g_{t_1} (1, 1),    d_{t_j} = M'_{t_j} P(t_{j-1}, t_j - 1) d_{t_{j-1}} + g_{t_j} (1, 1),
    effect = first component of P(t_k, step) d_{t_k},    P(a, b) = M_b ... M_{a+1}  (identity if a = b)

A gap's product ``P`` is applied to the deviations as at most log2 T maps from a table of products over 1,
2, 4, ... steps (binary lifting), so an example costs O(occurrences x log T) small operations instead of a
T-step rollout. All examples move together, one occurrence rank at a time (every example's first
occurrence, then the second, ...), and all test examples are columns of the same arrays. No map is ever
inverted: zero or negative alpha needs no special care (no division, no logarithm).

With ``mu = 0`` the velocity plays no part (``L_t = alpha_t L_{t-1} + beta_t``): maps are the scalars alpha
and deviations the scalars ``d_t = L'_t - L_t`` (first order), instead of 2 x 2 matrices and pairs.

The result equals re-simulating every leave-one-out curriculum (to rounding), for the unclipped
dynamics: a simulator with a loss floor is compared with ``simulate(..., clip=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.simulators.coefficients import StepCoefficients

_CHUNK_BYTES = 64 * 2**20  # bounds the working memory (lifting table, per-occurrence rows) per chunk of tests

# Maps are stacked component-first, (k, rows, n_test): k = 1 for first order (L -> m L), k = 4 for second order,
# the components (m00, m01, m10, m11) of [[m00, m01], [m10, m11]] acting on (L, v). Deviations are stacked the same
# way, (1 or 2, rows, n_test). Each component is one contiguous array, which numpy's operations favour.


def _step_maps(alpha: np.ndarray, momentum: float) -> np.ndarray:
    """The base's step maps for (T, n_test) alpha: (1, T, n_test) if ``momentum`` is 0, else (4, T, n_test)."""
    if not momentum:
        return alpha[None]
    maps = np.empty((4, *alpha.shape))
    maps[0] = alpha
    maps[1] = momentum
    np.subtract(alpha, 1.0, out=maps[2])
    maps[3] = momentum
    return maps


def _compose(second: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The maps ``second o first`` (apply ``first``, then ``second``), row by row: (k, rows, n_test)."""
    if second.shape[0] == 1:
        return second * first
    out = np.empty(np.broadcast_shapes(second.shape, first.shape))
    for row in (0, 2):  # a row of the product: second's row times first's columns
        left, right = second[row], second[row + 1]
        np.multiply(left, first[0], out=out[row])
        out[row] += right * first[2]
        np.multiply(left, first[1], out=out[row + 1])
        out[row + 1] += right * first[3]
    return out


def _apply(maps: np.ndarray, deviations: np.ndarray) -> np.ndarray:
    """The maps applied to the deviations, row by row: (1 or 2, rows, n_test)."""
    if maps.shape[0] == 1:
        return maps * deviations
    loss, velocity = deviations
    out = np.empty(deviations.shape)
    np.multiply(maps[0], loss, out=out[0])
    out[0] += maps[1] * velocity
    np.multiply(maps[2], loss, out=out[1])
    out[1] += maps[3] * velocity
    return out


def _lifting_table(maps: np.ndarray, longest: int) -> list[np.ndarray]:
    """Products of the step maps (k, T, n_test) over 1, 2, 4, ... <= ``longest`` steps.

    Level j holds, for every start a = 0 .. T - 2^j, the map of steps a+1 .. a+2^j: (k, T - 2^j + 1, n_test).
    """
    table = [maps]
    span = 1
    while 2 * span <= longest:
        shorter = table[-1]
        table.append(_compose(shorter[:, span:], shorter[:, :-span]))
        span *= 2
    return table


def _advance(table: list[np.ndarray], deviations: np.ndarray, start: np.ndarray, length: np.ndarray) -> None:
    """Apply the base's maps of steps start+1 .. start+length to the rows of ``deviations``, in place.

    A row is moved by the table's levels at the set bits of its length, in increasing order.
    """
    position = start.copy()
    for level, maps in enumerate(table):
        rows = np.flatnonzero((length >> level) & 1)
        if rows.size:
            deviations[:, rows] = _apply(maps.take(position[rows], axis=1), deviations[:, rows])
            position[rows] += 1 << level


def _jump(deviations: np.ndarray, edited_alpha: np.ndarray, jump: np.ndarray, momentum: float) -> None:
    """Apply the edited step ``d -> M' d + g (1, 1)`` to the rows of ``deviations``, in place.

    ``edited_alpha``, ``jump``: (rows, n_test) alpha'_t and g_t of each row's occurrence.
    """
    if not momentum:
        deviations *= edited_alpha
        deviations += jump
        return
    loss, velocity = deviations
    after = edited_alpha * loss
    after += momentum * velocity
    after += jump
    np.subtract(after, loss, out=velocity)  # (alpha' - 1) L + mu v + g
    loss[:] = after


def _base_losses(alpha: np.ndarray, beta: np.ndarray, initial: np.ndarray, momentum: float) -> np.ndarray:
    """The base curriculum's unclipped losses L_0 .. L_T from (T, n_test) coefficients: (T + 1, n_test).

    The recurrence of :func:`~simfluence.simulators.dynamics.unroll` for one curriculum, in its two-term form
    (``v_t = L_t - L_{t-1}``, ``v_0 = 0``) and in place: ``L_{t+1} = (alpha + mu) L_t - mu L_{t-1} + beta``.
    """
    losses = np.empty((alpha.shape[0] + 1, alpha.shape[1]))
    losses[0] = initial
    growth = alpha + momentum if momentum else alpha
    scaled_previous = momentum * losses[0]  # mu L_{t-1}, with L_{-1} = L_0
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging simulator shows up as inf, as in unroll
        for t in range(alpha.shape[0]):
            after = losses[t + 1]
            np.multiply(growth[t], losses[t], out=after)
            after += beta[t]
            if momentum:
                after -= scaled_previous
                np.multiply(losses[t], momentum, out=scaled_previous)
    return losses


@dataclass
class _Occurrences:
    """Where each example occurs (up to the compared step), rank-major for the pass over ranks.

    Attributes
    ----------
    examples : (n_examples,) pool ids of the examples present, most occurrences first.
    live : (most occurrences,) how many examples have more than r occurrences: block r of the arrays below holds
        the (r + 1)-th occurrence of each of ``examples[:live[r]]``, in that order (block 0: first occurrences).
    example, step, count, previous : (n_occurrences,) pool id, 1-based step, copies in that step's batch, and
        step of the example's previous occurrence (0 for a first occurrence).
    last : (n_examples,) step of each example's last occurrence.
    """

    examples: np.ndarray
    live: np.ndarray
    example: np.ndarray
    step: np.ndarray
    count: np.ndarray
    previous: np.ndarray
    last: np.ndarray

    @classmethod
    def of(cls, curriculum: Curriculum, stop: int) -> _Occurrences:
        """The occurrences in steps 1 .. ``stop``."""
        entries = curriculum.offsets[stop]
        keys, count = np.unique(curriculum.ids[:entries] * (stop + 1) + curriculum.step_of_entries()[:entries],
                                return_counts=True)  # (example, step) pairs, by example then step
        example, step = np.divmod(keys, stop + 1)
        examples, first, n_occurrences = np.unique(example, return_index=True, return_counts=True)
        rank = np.arange(keys.size) - np.repeat(first, n_occurrences)
        previous = np.zeros_like(step)
        previous[1:] = step[:-1]
        previous[rank == 0] = 0
        order = np.argsort(-n_occurrences, kind="stable")
        place = np.empty_like(order)
        place[order] = np.arange(order.size)
        rank_major = np.lexsort((np.repeat(place, n_occurrences), rank))
        return cls(examples=examples[order], live=np.bincount(rank), example=example[rank_major],
                   step=step[rank_major], count=count[rank_major], previous=previous[rank_major],
                   last=step[first + n_occurrences - 1][order])


def _effects(coef: StepCoefficients, occ: _Occurrences, initial: np.ndarray, stop: int, cols: slice) -> np.ndarray:
    """Leave-one-out effects at step ``stop`` on the tests ``cols``, for ``occ.examples``: (n_examples, n_cols)."""
    momentum = coef.momentum
    alpha, beta = coef.alpha[:stop, cols], coef.beta[:stop, cols]
    base = _base_losses(alpha, beta, initial, momentum)
    edited_alpha, edited_beta = coef.without(occ.example, occ.step, occ.count, cols)
    at = occ.step - 1
    jump = (edited_alpha - alpha[at]) * base[at] + (edited_beta - beta[at])  # g_t of every occurrence

    gap = occ.step - 1 - occ.previous  # steps between an occurrence and the previous one (first ones: unused)
    first = occ.examples.size
    table = _lifting_table(_step_maps(alpha, momentum), int(max(gap[first:].max(initial=0), (stop - occ.last).max())))
    deviations = np.empty((2 if momentum else 1, first, base.shape[1]))
    deviations[:] = jump[:first]
    done = first
    for n_live in occ.live[1:]:  # later occurrences, rank by rank; all examples at once
        block = slice(done, done + n_live)
        live = deviations[:, :n_live]
        _advance(table, live, occ.previous[block], gap[block])
        _jump(live, edited_alpha[block], jump[block], momentum)
        done += n_live
    _advance(table, deviations, occ.last, stop - occ.last)
    return deviations[0]


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
    if step == 0 or curriculum.offsets[step] == 0:
        return effects

    occ = _Occurrences.of(curriculum, step)
    components = 4 if coef.momentum else 1
    column_bytes = 8 * (components * step * step.bit_length() + 8 * occ.step.size)  # table; per-occurrence rows
    chunk = max(1, _CHUNK_BYTES // column_bytes)
    for lo in range(0, n_test, chunk):  # chunks of test examples bound the memory
        cols = slice(lo, min(n_test, lo + chunk))
        effects[occ.examples, cols] = _effects(coef, occ, initial[cols], step, cols)
    return effects
