"""The dynamics every simulator of the linear family shares, written once.

Simfluence-Linear (the paper's form and its extensions), Simfluence-Additive and the fixed-effects
gradient simulators (TracIn, influence functions, TrackStar) all step a test example's loss as::

    v_t = mu * v_{t-1} + (alpha_t - 1) * L_{t-1} + beta_t        L_t = L_{t-1} + v_t     (v_0 = 0)
    alpha_t = const_alpha(t) + w_t * sum_{i in c_t} A_{k(t)}[i] / d_t
    beta_t  = const_beta(t)  + w_t * sum_{i in c_t} B_{k(t)}[i] / d_t

(``mu = 0``: ``L_t = alpha_t L_{t-1} + beta_t``). A subclass says only what its pieces are:

- ``_effect_tables()``: the per-example effects ``A`` (or None for an additive model) and ``B``, each
  (K, n_pool, n_test): K tables, of which step t uses table ``k(t)`` (``_table_of_steps``; one table for the
  learned simulators, one per checkpoint for time-varying gradient scores);
- ``_step_constants(T)``: ``const_alpha, const_beta`` (T, n_test) — ``alpha_center`` and per-step terms;
- ``_lr_reference()``: with a reference, ``w_t = lr_t / reference`` (effects scale with the step's learning
  rate), else 1; ``_batch_mean()``: ``d_t = |c_t|`` (mean over the batch) instead of 1;
- ``_momentum()`` (mu) and ``loss_floor_`` (a floor the loss never crosses, or None).

From these the base class builds :class:`StepCoefficients` (:meth:`LinearDynamics.step_coefficients`, the one
place that turns a curriculum into per-step coefficients), rolls them out (:meth:`simulate`, chunked over
curricula to bound memory) and answers exact leave-one-out (:meth:`leave_one_out`, via
:mod:`simfluence.simulators.loo`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from simfluence.curriculum import Curriculum
from simfluence.design import FeatureSpec, schedule_for, step_features
from simfluence.errors import SimfluenceError
from simfluence.simulators.base import Simulator, as_curricula, as_initial
from simfluence.simulators.coefficients import StepCoefficients, batch_divisor
from simfluence.simulators.loo import exact_loo

_SIM_CHUNK_BYTES = 128 * 2**20  # bounds the working memory of a rollout (coefficients or batch rows)
_SIM_MAX_THREADS = 4  # simulation threads at most (parts of the curricula, one per core)
_SIM_MIN_PER_THREAD = 128  # curricula per thread at least: fewer are not worth a thread
_SIM_BLOCK_BYTES = 2 * 2**20  # pool sums made at a time by the one-table rollout (so that they stay in cache)


def _thread_parts(n_curricula: int) -> list[slice]:
    """Contiguous parts of the curricula to simulate in parallel threads: one per core (at most
    ``_SIM_MAX_THREADS``), each of at least ``_SIM_MIN_PER_THREAD`` curricula; one part when that is all it is worth."""
    n_parts = max(1, min(os.cpu_count() or 1, _SIM_MAX_THREADS, n_curricula // _SIM_MIN_PER_THREAD))
    bounds = np.linspace(0, n_curricula, n_parts + 1).round().astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def unroll(
    alpha: np.ndarray,
    beta: np.ndarray,
    initial: np.ndarray,
    momentum: float = 0.0,
    active: np.ndarray | None = None,
    floor: float | None = None,
) -> np.ndarray:
    """Run ``v_t = mu v_{t-1} + (alpha_t - 1) L_{t-1} + beta_t``, ``L_t = L_{t-1} + v_t`` from ``v_0 = 0``.

    With ``momentum = 0`` this is ``L_t = alpha_t L_{t-1} + beta_t``.

    Parameters
    ----------
    alpha, beta : (n_curricula, T, n_test).
    initial : (n_curricula, n_test).
    momentum : velocity decay mu.
    active : (n_curricula, T) bool; at inactive steps (after a curriculum's end) the loss is held.
    floor : lower bound of the loss (0 for non-negative losses); a step that would cross it stops there
        and its velocity becomes the change actually made.

    Returns
    -------
    (n_curricula, T + 1, n_test) trajectories, index 0 = ``initial``.
    """
    n_cur, horizon, n_test = alpha.shape
    out = np.empty((n_cur, horizon + 1, n_test))
    out[:, 0] = initial
    velocity = np.zeros((n_cur, n_test))
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging simulator shows up as inf in metrics
        for t in range(horizon):  # the recurrence is sequential in t; all curricula and tests at once
            velocity = momentum * velocity + (alpha[:, t] - 1.0) * out[:, t] + beta[:, t]
            if active is not None:
                velocity *= active[:, t, None]
            out[:, t + 1] = out[:, t] + velocity
            if floor is not None:
                np.maximum(out[:, t + 1], floor, out=out[:, t + 1])
                velocity = out[:, t + 1] - out[:, t]
    return out


class LinearDynamics(Simulator):
    """Base of the simulators whose step is the linear (momentum) recurrence of the module docstring."""

    tags: ClassVar[dict[str, Any]] = {**Simulator.tags, "exact_loo": True}

    # ------------------------------------------------------------------ what a subclass provides
    def _effect_tables(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(A or None, B), each (K, n_pool, n_test)."""
        raise NotImplementedError

    def _table_of_steps(self, steps: np.ndarray) -> np.ndarray:
        """(n,) index of the effect table used at each 1-based step (default: the only one)."""
        return np.zeros(np.shape(steps), dtype=np.int64)

    def _step_constants(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """const_alpha, const_beta: each broadcastable to (n_steps, n_test)."""
        return np.ones((1, 1)), np.zeros((1, 1))

    def _lr_reference(self) -> float | None:
        """Effects are scaled by ``lr_t / reference`` when this is not None."""
        return None

    def _batch_mean(self) -> bool:
        return False

    def _momentum(self) -> float:
        """Velocity decay mu of the recurrence (0: first order)."""
        return float(self.momentum_)

    # ------------------------------------------------------------------ coefficients
    def _learning_rates(self, curricula: list[Curriculum], learning_rates: Sequence[np.ndarray] | None):
        """The learning rates to weight effects with: the given ones, else the schedule seen in fitting."""
        if self._lr_reference() is None:
            return None
        if learning_rates is not None:
            return learning_rates
        schedule = self._fitted_schedule()
        return [schedule_for(schedule, cur.n_steps) for cur in curricula]

    def _fitted_schedule(self) -> np.ndarray:
        """The mean learning rate of each step in the training runs (raises if some step's was not logged)."""
        schedule = getattr(self, "lr_schedule_", None)
        if schedule is None or not np.isfinite(schedule).all():
            raise SimfluenceError(f"{type(self).__name__} weights effects by the learning rate, but none were "
                                  "given and the training runs did not log them at every step")
        return schedule

    def _coefficients(
        self, curricula: list[Curriculum], learning_rates: Sequence[np.ndarray] | None, horizon: int,
        tables: tuple[np.ndarray | None, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """alpha, beta, and the undivided pool sums pool_alpha (None if additive), pool_beta, and batch sizes.

        ``tables`` replaces ``_effect_tables()`` (e.g. unscaled scores during calibration).
        Returns arrays of shape (n_curricula, horizon, n_test) (sizes: (n_curricula, horizon)).
        """
        mult, add = self._effect_tables() if tables is None else tables
        n_pool, n_test = add.shape[1], add.shape[2]
        for index, cur in enumerate(curricula):
            if cur.ids.size and cur.ids.max() >= n_pool:
                raise SimfluenceError(f"curriculum {index} uses pool position {int(cur.ids.max())}, outside the "
                                      f"fitted pool 0..{n_pool - 1}")
        reference = self._lr_reference()
        rows = step_features(curricula, FeatureSpec(n_pool, 0, reference, False),
                             self._learning_rates(curricula, learning_rates), n_steps=horizon)  # w_t * counts
        which = np.tile(self._table_of_steps(np.arange(1, horizon + 1)), len(curricula))
        pool_beta = np.zeros((len(curricula) * horizon, n_test))
        pool_alpha = None if mult is None else np.zeros_like(pool_beta)
        for k in range(add.shape[0]):
            selected = np.flatnonzero(which == k) if add.shape[0] > 1 else slice(None)
            part = rows[selected]
            pool_beta[selected] = np.asarray(part @ add[k])
            if mult is not None:
                pool_alpha[selected] = np.asarray(part @ mult[k])
        sizes = np.zeros((len(curricula), horizon))
        for index, cur in enumerate(curricula):
            sizes[index, : cur.n_steps] = cur.batch_sizes
        divisor = batch_divisor(sizes, self._batch_mean())[..., None]
        const_alpha, const_beta = (np.broadcast_to(c, (horizon, n_test)) for c in self._step_constants(horizon))
        pool_beta = pool_beta.reshape(len(curricula), horizon, n_test)
        beta = const_beta + pool_beta / divisor
        if pool_alpha is None:
            alpha = np.broadcast_to(const_alpha, beta.shape)
        else:
            pool_alpha = pool_alpha.reshape(len(curricula), horizon, n_test)
            alpha = const_alpha + pool_alpha / divisor
        return alpha, beta, pool_alpha, pool_beta, sizes

    def step_coefficients(self, curriculum: Curriculum, learning_rates: np.ndarray | None = None) -> StepCoefficients:
        """The per-step coefficients of one curriculum (T steps), with the pieces needed to edit a batch.

        Parameters
        ----------
        curriculum : pool positions, T steps.
        learning_rates : (T,) learning rate of each step (default: the schedule seen in fitting).
        """
        self.check_fitted()
        n_steps = curriculum.n_steps
        rates = None
        if learning_rates is not None:
            rates = np.asarray(learning_rates, dtype=np.float64)
            if rates.shape != (n_steps,) or not np.isfinite(rates).all():
                raise SimfluenceError(f"need {n_steps} finite learning rates for this curriculum")
            rates = [rates]
        alpha, beta, pool_alpha, pool_beta, sizes = self._coefficients([curriculum], rates, n_steps)
        reference = self._lr_reference()
        lr_weight = np.ones(n_steps)
        if reference is not None:
            lr_weight = np.asarray(self._learning_rates([curriculum], rates)[0], dtype=np.float64) / reference
        mult, add = self._effect_tables()
        const_alpha, const_beta = (np.broadcast_to(c, (n_steps, add.shape[2])) for c in self._step_constants(n_steps))
        return StepCoefficients(
            alpha=alpha[0], beta=beta[0], const_alpha=const_alpha, const_beta=const_beta,
            pool_alpha=np.zeros_like(pool_beta[0]) if pool_alpha is None else pool_alpha[0], pool_beta=pool_beta[0],
            lr_weight=lr_weight, size=sizes[0], table=self._table_of_steps(np.arange(1, n_steps + 1)),
            batch_mean=self._batch_mean(), mult=mult, add=add, momentum=self._momentum(),
        )

    # ------------------------------------------------------------------ rollout and leave-one-out
    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
        clip: bool = True,
    ) -> np.ndarray:
        """Predict loss trajectories (see :meth:`Simulator.simulate`).

        ``clip=False`` ignores the loss floor (the plain linear dynamics, which the exact leave-one-out
        reproduces).
        """
        self.check_fitted()
        curricula = as_curricula(curricula)
        n_test = self._effect_tables()[1].shape[2]
        initial = as_initial(initial_losses, len(curricula), n_test)
        if learning_rates is not None and len(learning_rates) != len(curricula):
            raise SimfluenceError(f"{len(learning_rates)} learning-rate schedules for {len(curricula)} curricula")
        lengths = np.array([cur.n_steps for cur in curricula], dtype=np.int64)
        horizon = int(lengths.max(initial=0))
        out = np.empty((len(curricula), horizon + 1, n_test))
        if self._effect_tables()[1].shape[0] == 1:
            parts = _thread_parts(len(curricula))
            if len(parts) == 1:
                self._simulate_one_table(curricula, initial, learning_rates, lengths, horizon, clip, out)
                return out
            # curricula are independent and every part writes its own rows of ``out``: threads give the same bits
            # (the sparse products and numpy's loops release the GIL)
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(lambda part: self._simulate_one_table(
                    curricula[part], initial[part], None if learning_rates is None else learning_rates[part],
                    lengths[part], horizon, clip, out[part]), parts))
            return out
        chunk = max(1, _SIM_CHUNK_BYTES // (32 * max(horizon, 1) * n_test))
        for lo in range(0, len(curricula), chunk):  # chunks of curricula bound memory
            hi = min(len(curricula), lo + chunk)
            rates = None if learning_rates is None else learning_rates[lo:hi]
            alpha, beta, _, _, _ = self._coefficients(curricula[lo:hi], rates, horizon)
            active = np.arange(1, horizon + 1)[None, :] <= lengths[lo:hi, None]
            out[lo:hi] = unroll(alpha, beta, initial[lo:hi], self._momentum(), active,
                                self.loss_floor_ if clip else None)
        return out

    def _simulation_rows(
        self, curricula: list[Curriculum], learning_rates: Sequence[np.ndarray] | None, horizon: int, n_pool: int,
        constant_of_step: np.ndarray | None = None,
    ) -> sp.csr_matrix:
        """Step-major csr of ``w_t / d_t * counts(c_t)``: row ``(t - 1) * n_curricula + c`` is curriculum c's step t.

        Weights as in :meth:`_coefficients` (``w_t`` on the counts, then the batch divisor); steps after a
        curriculum's end are empty rows. With ``constant_of_step`` ((horizon,) ints), every row of step t also holds
        weight 1 at column ``n_pool + constant_of_step[t - 1]`` (its last entry): a product with a table whose extra
        rows are per-step constants adds them for free. Built for all curricula at once: each entry is scattered
        from its curriculum's ids straight to its step-major place.
        """
        n_cur = len(curricula)
        sizes = np.zeros((n_cur, horizon), dtype=np.int64)
        for index, cur in enumerate(curricula):
            sizes[index, : cur.n_steps] = cur.batch_sizes
        ids = np.concatenate([cur.ids for cur in curricula]) if n_cur else np.zeros(0, np.int64)
        if ids.size and ids.max() >= n_pool:
            index = next(i for i, cur in enumerate(curricula) if cur.ids.size and cur.ids.max() >= n_pool)
            raise SimfluenceError(f"curriculum {index} uses pool position {int(curricula[index].ids.max())}, outside "
                                  f"the fitted pool 0..{n_pool - 1}")
        weight = np.ones((n_cur, horizon))
        reference = self._lr_reference()
        if reference is not None and learning_rates is None:  # the schedule seen in fitting, the same for all
            weight[:] = schedule_for(self._fitted_schedule(), horizon) / reference
        elif reference is not None:
            for index, (cur, lrs) in enumerate(zip(curricula, learning_rates, strict=True)):
                lrs = np.asarray(lrs, dtype=np.float64)
                if lrs.shape != (cur.n_steps,) or not np.isfinite(lrs).all():
                    raise SimfluenceError(
                        f"curriculum {index}: need {cur.n_steps} finite learning rates, got shape {lrs.shape}"
                        + ("" if lrs.shape != (cur.n_steps,) else " with NaN (learning rate not logged?)")
                    )
                weight[index, : cur.n_steps] = lrs / reference
        if self._batch_mean():
            weight /= batch_divisor(sizes, True)
        extra = 0 if constant_of_step is None else 1
        indptr = np.zeros(n_cur * horizon + 1, dtype=np.int64)
        np.cumsum((sizes.T + extra).ravel(), out=indptr[1:])
        indices = np.empty(indptr[-1], dtype=np.int64)
        data = np.empty(indptr[-1])
        source_start = np.zeros(n_cur * horizon, dtype=np.int64)  # where each (curriculum, step) starts in ids
        np.cumsum(sizes.ravel()[:-1], out=source_start[1:])
        shift = indptr[:-1].reshape(horizon, n_cur).T.ravel() - source_start
        target = np.repeat(shift, sizes.ravel()) + np.arange(ids.size)
        indices[target] = ids
        data[target] = np.repeat(weight.ravel(), sizes.ravel())
        n_cols = n_pool
        if extra:
            indices[indptr[1:] - 1] = n_pool + np.repeat(constant_of_step, n_cur)
            data[indptr[1:] - 1] = 1.0
            n_cols += int(constant_of_step.max(initial=0)) + 1
        return sp.csr_matrix((data, indices, indptr), shape=(n_cur * horizon, n_cols))  # repeated ids add up

    def _simulate_one_table(
        self, curricula: list[Curriculum], initial: np.ndarray, learning_rates: Sequence[np.ndarray] | None,
        lengths: np.ndarray, horizon: int, clip: bool, out: np.ndarray,
    ) -> None:
        """:meth:`simulate` for simulators with one effect table, into ``out`` (n_curricula, horizon + 1, n_test).

        Whether or not the floor stopped a step, the velocity is the change made (``v_t = L_t - L_{t-1}``), so the
        recurrence runs in its two-term form, one to five array operations a step::

            L_{t+1} = (1 + mu + a_t) L_t - mu L_{t-1} + b_t     (L_{-1} = L_0),  then the floor
            a_t = alpha_t - 1 = const_alpha_t - 1 + pool_alpha_t        b_t = beta_t = const_beta_t + pool_beta_t

        Sparse products of the step-major rows of :meth:`_simulation_rows` with the table ``[A | B]`` (``B`` alone for
        additive models, whose ``alpha_t`` is the constant) give ``1 + mu + a_t`` and ``b_t``: the table gets extra
        rows holding the step constants, which every row of their step adds with weight 1. The products are made a
        few steps at a time (``_SIM_BLOCK_BYTES``), so that they are still in cache when the recurrence reads them,
        and the losses of those steps are kept step-major (contiguous) until copied to ``out``. Steps after a
        curriculum's end are computed like the others and then overwritten by the held loss.
        """
        mult, add = self._effect_tables()
        n_pool, n_test = add.shape[1], add.shape[2]
        momentum = self._momentum()
        const_alpha, const_beta = (np.broadcast_to(np.asarray(c, dtype=np.float64), (horizon, n_test))
                                   for c in self._step_constants(horizon))
        growth = const_alpha + momentum  # 1 + mu + (const_alpha - 1): the multiplier of L_t without the pool's part
        if mult is None:
            table, constants = add[0], const_beta
        else:
            table, constants = np.concatenate([mult[0], add[0]], axis=1), np.concatenate([growth, const_beta], axis=1)
        unit_growth = mult is None and bool(np.all(growth == 1.0))  # additive, no momentum: L_{t+1} = L_t + b_t
        constant_of_step = None
        if np.any(constants):  # one extra table row per distinct step constant
            distinct = bool(np.any(constants != constants[:1]))
            table = np.concatenate([table, constants if distinct else constants[:1]])
            constant_of_step = np.arange(horizon) if distinct else np.zeros(horizon, dtype=np.int64)
        floor = self.loss_floor_ if clip else None
        out[:, 0] = initial
        step_bytes = 8 * max(1, table.shape[1])  # of one curriculum's pool sums at one step
        rows_bytes = 16 * max(1, horizon + max((cur.ids.size for cur in curricula), default=0))  # one's rows
        chunk = max(1, min(_SIM_BLOCK_BYTES // step_bytes, _SIM_CHUNK_BYTES // rows_bytes))  # curricula at a time
        for lo in range(0, len(curricula), chunk):
            hi = min(len(curricula), lo + chunk)
            n_cur = hi - lo
            rates = None if learning_rates is None else learning_rates[lo:hi]
            rows = self._simulation_rows(curricula[lo:hi], rates, horizon, n_pool, constant_of_step)
            block = max(1, _SIM_BLOCK_BYTES // (step_bytes * n_cur))  # steps at a time
            loss = np.empty((block + 1, n_cur, n_test))  # step-major: loss[s] = L_{start + s}
            loss[0] = initial[lo:hi]
            scaled_previous = momentum * loss[0]  # mu L_{t-1}
            for start in range(0, horizon, block):
                stop = min(horizon, start + block)
                pool = np.asarray(rows[start * n_cur: stop * n_cur] @ table).reshape(stop - start, n_cur, -1)
                with np.errstate(over="ignore", invalid="ignore"):  # a diverging simulator shows as inf in metrics
                    for step in range(stop - start):
                        after = loss[step + 1]
                        if unit_growth:
                            np.add(loss[step], pool[step, :, -n_test:], out=after)
                        else:
                            np.multiply(growth[start + step] if mult is None else pool[step, :, :n_test], loss[step],
                                        out=after)
                            after += pool[step, :, -n_test:]
                        if momentum:
                            after -= scaled_previous
                            np.multiply(loss[step], momentum, out=scaled_previous)
                        if floor is not None:
                            np.maximum(after, floor, out=after)
                out[lo:hi, start + 1: stop + 1] = loss[1: stop - start + 1].transpose(1, 0, 2)
                loss[0] = loss[stop - start]
        for index in np.flatnonzero(lengths < horizon):  # hold the loss after the end
            held = out[index, lengths[index]]
            out[index, lengths[index] + 1:] = held if floor is None else np.maximum(held, floor)

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
        chunk: int = 256,
    ) -> np.ndarray:
        """Exact leave-one-out effects of every pool example without re-simulation (:mod:`.loo`).

        Equal (to rounding) to re-simulating every leave-one-out curriculum with the unclipped dynamics
        (``simulate(..., clip=False)``). See :meth:`Simulator.leave_one_out` for the result's layout.
        """
        coefficients = self.step_coefficients(curriculum, learning_rates)
        return exact_loo(coefficients, curriculum, initial_losses, step)
