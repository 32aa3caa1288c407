"""Curricula: which pool examples each training step consumed, and counterfactual edits of them.

A curriculum is the ragged sequence of batches c_1, ..., c_T of one training run. Each batch is a multiset
of pool ids (an id repeated within a batch counts twice; a batch may be empty), stored CSR-style as
``offsets`` (T + 1,) and ``ids`` (n_entries,): the batch of step t is ``ids[offsets[t-1]:offsets[t]]``.

A ``Curriculum`` is immutable. Counterfactual questions (drop example i, duplicate it, show it earlier, leave
a subset out, reverse the order, ...) are answered by *pure edits* that return a new curriculum, which a
simulator then rolls out. ``to_csr`` and ``stack_csr`` turn curricula into the sparse (steps x pool) count
matrices the fitting and simulation code works with; ``shuffled_epochs``, ``random_subset`` and
``random_curricula`` draw the usual random training orders.

Every invalid input raises :class:`~simfluence.errors.CurriculumError` naming the step or id at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from simfluence.errors import CurriculumError

__all__ = [
    "Curriculum",
    "random_curricula",
    "random_subset",
    "shuffled_epochs",
    "stack_csr",
]

SeedLike = int | np.random.Generator | None


def _as_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int, or raise CurriculumError if it is not an integer."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Integral):
        raise CurriculumError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_int_array(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a fresh 1-D int64 array; an empty input of any dtype is allowed."""
    if isinstance(values, set | frozenset):
        values = sorted(values)
    elif not isinstance(values, np.ndarray) and isinstance(values, Iterable):
        values = list(values)
    try:
        array = np.array(values)
    except (TypeError, ValueError) as exc:
        raise CurriculumError(f"{name} could not be read as an integer array: {exc}") from exc
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise CurriculumError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise CurriculumError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise CurriculumError(f"{name} holds id {int(array.max())}, too large for int64")
    return array.astype(np.int64)


def _check_ids(ids: np.ndarray, n_pool: int | None, name: str) -> None:
    """Raise CurriculumError naming the first id that is negative or >= n_pool."""
    if ids.size == 0:
        return
    bad = ids < 0 if n_pool is None else (ids < 0) | (ids >= n_pool)
    if bad.any():
        position = int(np.argmax(bad))
        bound = "be >= 0" if n_pool is None else f"lie in [0, {n_pool})"
        raise CurriculumError(f"{name}[{position}] = {int(ids[position])}: pool ids must {bound}")


def _check_n_pool(n_pool: Any) -> int | None:
    if n_pool is None:
        return None
    n_pool = _as_int(n_pool, "n_pool")
    if n_pool < 0:
        raise CurriculumError(f"n_pool must be >= 0, got {n_pool}")
    return n_pool


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class Curriculum:
    """Immutable ragged curriculum: steps 1..n_steps, step t's batch is ids[offsets[t-1]:offsets[t]].

    Parameters
    ----------
    offsets : (n_steps + 1,) integers, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(ids)``.
    ids : (n_entries,) pool ids, >= 0 (and < ``n_pool`` when it is given). Order within a batch is kept.
    n_pool : size of the training pool, or None when unknown.

    Attributes
    ----------
    offsets : (n_steps + 1,) read-only int64 array.
    ids : (n_entries,) read-only int64 array.
    n_pool : int or None.
    """

    __slots__ = ("offsets", "ids", "n_pool")

    offsets: np.ndarray
    ids: np.ndarray
    n_pool: int | None

    def __init__(self, offsets: ArrayLike, ids: ArrayLike, n_pool: int | None = None):
        offsets = _as_int_array(offsets, "offsets")
        ids = _as_int_array(ids, "ids")
        n_pool = _check_n_pool(n_pool)
        if offsets.size == 0:
            raise CurriculumError("offsets must have n_steps + 1 >= 1 entries, got an empty array")
        if offsets[0] != 0:
            raise CurriculumError(f"offsets[0] must be 0, got {int(offsets[0])}")
        decreasing = np.flatnonzero(offsets[1:] < offsets[:-1])  # no subtraction: int64 differences can wrap
        if decreasing.size:
            step = int(decreasing[0]) + 1
            raise CurriculumError(
                f"offsets must be non-decreasing: step {step} has offsets {int(offsets[step - 1])} .. "
                f"{int(offsets[step])}"
            )
        if offsets[-1] != ids.size:
            raise CurriculumError(f"offsets[-1] = {int(offsets[-1])} must equal len(ids) = {ids.size}")
        _check_ids(ids, n_pool, "ids")
        object.__setattr__(self, "offsets", _read_only(offsets))
        object.__setattr__(self, "ids", _read_only(ids))
        object.__setattr__(self, "n_pool", n_pool)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Curriculum is immutable; use an edit method instead of setting {name!r}")

    def __reduce__(self) -> tuple[type[Curriculum], tuple[np.ndarray, np.ndarray, int | None]]:
        return (Curriculum, (self.offsets, self.ids, self.n_pool))

    @classmethod
    def _trusted(cls, offsets: np.ndarray, ids: np.ndarray, n_pool: int | None) -> Curriculum:
        """Build from arrays already known to be valid int64 (the edits' results), skipping validation."""
        new = object.__new__(cls)
        object.__setattr__(new, "offsets", _read_only(np.ascontiguousarray(offsets, dtype=np.int64)))
        object.__setattr__(new, "ids", _read_only(np.ascontiguousarray(ids, dtype=np.int64)))
        object.__setattr__(new, "n_pool", n_pool)
        return new

    @classmethod
    def from_batches(cls, batches: Iterable[Iterable[int]], n_pool: int | None = None) -> Curriculum:
        """Build a curriculum from one iterable of pool ids per step (step 1 first)."""
        arrays = []
        for step, batch in enumerate(batches, 1):
            if isinstance(batch, str | bytes) or np.ndim(batch) == 0 and not isinstance(batch, Iterable):
                raise CurriculumError(f"batch of step {step} must be a sequence of pool ids, got {batch!r}")
            arrays.append(_as_int_array(batch, f"batch of step {step}"))
        sizes = np.array([array.size for array in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(offsets, ids, n_pool)

    # ------------------------------------------------------------------ views

    @property
    def n_steps(self) -> int:
        return self.offsets.size - 1

    @property
    def n_entries(self) -> int:
        return self.ids.size

    @property
    def batch_sizes(self) -> np.ndarray:
        """(n_steps,) number of entries (with repeats) of each step's batch."""
        return np.diff(self.offsets)

    def _check_step(self, step: Any, name: str = "step") -> int:
        step = _as_int(step, name)
        if not 1 <= step <= self.n_steps:
            raise CurriculumError(f"{name} {step} is out of range: steps are 1..{self.n_steps}")
        return step

    def _check_id(self, example_id: Any, name: str = "example_id") -> int:
        example_id = _as_int(example_id, name)
        if example_id < 0 or (self.n_pool is not None and example_id >= self.n_pool):
            bound = "be >= 0" if self.n_pool is None else f"lie in [0, {self.n_pool})"
            raise CurriculumError(f"{name} {example_id} is out of range: pool ids must {bound}")
        return example_id

    def _check_id_array(self, example_ids: Any) -> np.ndarray:
        example_ids = _as_int_array(example_ids, "example_ids")
        _check_ids(example_ids, self.n_pool, "example_ids")
        return example_ids

    def batch(self, step: int) -> np.ndarray:
        """(batch_size,) read-only ids of the batch of ``step`` (1-based)."""
        step = self._check_step(step)
        return self.ids[self.offsets[step - 1] : self.offsets[step]]

    def batches(self) -> list[np.ndarray]:
        """The n_steps batches, each a read-only view into ``ids``."""
        return np.split(self.ids, self.offsets[1:-1]) if self.n_steps else []

    def step_of_entries(self) -> np.ndarray:
        """(n_entries,) 1-based step of each entry of ``ids``."""
        return np.repeat(np.arange(1, self.n_steps + 1, dtype=np.int64), self.batch_sizes)

    def _pool_width(self, n_pool: int | None) -> int:
        """Number of columns for a (steps x pool) matrix: n_pool, else self.n_pool, else max id + 1."""
        n_pool = _check_n_pool(n_pool)
        if n_pool is None:
            if self.n_pool is not None:
                return self.n_pool
            return int(self.ids.max()) + 1 if self.ids.size else 0
        if self.n_pool is not None and n_pool != self.n_pool:
            raise CurriculumError(f"n_pool {n_pool} does not match the curriculum's n_pool {self.n_pool}")
        _check_ids(self.ids, n_pool, "ids")
        return n_pool

    def to_csr(self, n_pool: int | None = None) -> sp.csr_matrix:
        """(n_steps, n_pool) float64 counts: entry (t - 1, i) is how often id i is in the batch of step t.

        ``n_pool`` defaults to the curriculum's own, else to the largest id + 1.
        """
        width = self._pool_width(n_pool)
        data = np.ones(self.n_entries, dtype=np.float64)
        matrix = sp.csr_matrix((data, self.ids.copy(), self.offsets.copy()), shape=(self.n_steps, width))
        matrix.sum_duplicates()
        return matrix

    def counts(self, n_pool: int | None = None) -> np.ndarray:
        """(n_pool,) int64: how often each pool id is used over the whole curriculum."""
        width = self._pool_width(n_pool)
        return np.bincount(self.ids, minlength=width).astype(np.int64)

    def __len__(self) -> int:
        return self.n_steps

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Curriculum):
            return NotImplemented
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.ids, other.ids)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Curriculum(n_steps={self.n_steps}, n_entries={self.n_entries}, n_pool={self.n_pool})"

    # ------------------------------------------------------------------ edits

    def _masked(self, keep: np.ndarray) -> Curriculum:
        """Keep the entries where ``keep`` is True; every step stays (possibly empty)."""
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return Curriculum._trusted(kept_before[self.offsets], self.ids[keep], self.n_pool)

    def _reordered(self, order: np.ndarray) -> Curriculum:
        """New curriculum whose step k + 1 is this curriculum's step order[k] + 1 (0-based ``order``)."""
        sizes = self.batch_sizes[order]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(self.offsets[order] - offsets[:-1], sizes)
        return Curriculum._trusted(offsets, self.ids[gather], self.n_pool)

    def remove(self, example_ids: ArrayLike) -> Curriculum:
        """Drop every occurrence of ``example_ids``; batches may become empty, the number of steps is kept."""
        example_ids = self._check_id_array(example_ids)
        return self._masked(~np.isin(self.ids, example_ids))

    def keep_only(self, example_ids: ArrayLike) -> Curriculum:
        """Drop every entry whose id is not in ``example_ids`` (restrict training to a subset of the pool)."""
        example_ids = self._check_id_array(example_ids)
        return self._masked(np.isin(self.ids, example_ids))

    def duplicate(self, example_id: int, step: int | None = None) -> Curriculum:
        """Add one more occurrence of ``example_id``.

        With ``step`` given, the copy is appended to that step's batch (the id need not be there already).
        Without it, every existing occurrence is doubled in place (a copy right after it, same step); an id
        that never occurs then gives an unchanged curriculum.
        """
        example_id = self._check_id(example_id)
        if step is not None:
            step = self._check_step(step)
            position = self.offsets[step]
            ids = np.insert(self.ids, position, example_id)
            offsets = self.offsets.copy()
            offsets[step:] += 1
            return Curriculum._trusted(offsets, ids, self.n_pool)
        positions = np.flatnonzero(self.ids == example_id)
        ids = np.insert(self.ids, positions + 1, example_id)
        offsets = self.offsets + np.searchsorted(positions, self.offsets, side="left")
        return Curriculum._trusted(offsets, ids, self.n_pool)

    def move(self, example_id: int, to_step: int, from_step: int | None = None) -> Curriculum:
        """Move one occurrence of ``example_id`` to the end of the batch of ``to_step``.

        The occurrence moved is the first one in the curriculum, or the first one in ``from_step`` if given.
        Raises CurriculumError if there is no such occurrence.
        """
        example_id = self._check_id(example_id)
        to_step = self._check_step(to_step, "to_step")
        if from_step is None:
            found = np.flatnonzero(self.ids == example_id)
            if found.size == 0:
                raise CurriculumError(
                    f"example_id {example_id} does not occur in the curriculum; nothing to move"
                )
            position = int(found[0])
            from_step = int(np.searchsorted(self.offsets, position, side="right"))
        else:
            from_step = self._check_step(from_step, "from_step")
            found = np.flatnonzero(self.batch(from_step) == example_id)
            if found.size == 0:
                raise CurriculumError(
                    f"example_id {example_id} does not occur in step {from_step}; nothing to move"
                )
            position = int(self.offsets[from_step - 1]) + int(found[0])
        ids = np.delete(self.ids, position)
        offsets = self.offsets.copy()
        offsets[from_step:] -= 1
        ids = np.insert(ids, offsets[to_step], example_id)
        offsets[to_step:] += 1
        return Curriculum._trusted(offsets, ids, self.n_pool)

    def replace(self, old_id: int, new_id: int) -> Curriculum:
        """Every occurrence of ``old_id`` becomes ``new_id`` (no change if ``old_id`` never occurs)."""
        old_id = self._check_id(old_id, "old_id")
        new_id = self._check_id(new_id, "new_id")
        ids = np.where(self.ids == old_id, new_id, self.ids)
        return Curriculum._trusted(self.offsets.copy(), ids, self.n_pool)

    def swap_batches(self, step_a: int, step_b: int) -> Curriculum:
        """Exchange the batches of ``step_a`` and ``step_b``."""
        step_a = self._check_step(step_a, "step_a")
        step_b = self._check_step(step_b, "step_b")
        order = np.arange(self.n_steps)
        order[[step_a - 1, step_b - 1]] = order[[step_b - 1, step_a - 1]]
        return self._reordered(order)

    def reverse(self) -> Curriculum:
        """The same batches in reverse order (each batch's own order is kept)."""
        return self._reordered(np.arange(self.n_steps)[::-1])

    def truncate(self, n_steps: int) -> Curriculum:
        """The first ``n_steps`` steps (0 <= n_steps <= self.n_steps)."""
        n_steps = _as_int(n_steps, "n_steps")
        if not 0 <= n_steps <= self.n_steps:
            raise CurriculumError(f"cannot truncate to {n_steps} steps: the curriculum has {self.n_steps}")
        end = self.offsets[n_steps]
        return Curriculum._trusted(self.offsets[: n_steps + 1].copy(), self.ids[:end].copy(), self.n_pool)

    def concat(self, other: Curriculum) -> Curriculum:
        """This curriculum's steps followed by ``other``'s.

        The pools must agree where both are known; the result takes whichever is known.
        """
        if not isinstance(other, Curriculum):
            raise CurriculumError(f"can only concat a Curriculum, got {type(other).__name__}")
        if self.n_pool is not None and other.n_pool is not None and self.n_pool != other.n_pool:
            raise CurriculumError(
                f"cannot concat curricula over pools of {self.n_pool} and {other.n_pool} ids"
            )
        n_pool = self.n_pool if self.n_pool is not None else other.n_pool
        _check_ids(self.ids, n_pool, "ids")
        _check_ids(other.ids, n_pool, "other.ids")
        offsets = np.concatenate([self.offsets, other.offsets[1:] + self.n_entries])
        return Curriculum._trusted(offsets, np.concatenate([self.ids, other.ids]), n_pool)


# ---------------------------------------------------------------------- random curricula


def shuffled_epochs(
    n_pool: int,
    batch_size: int,
    n_steps: int,
    seed: SeedLike = None,
    pool_ids: ArrayLike | None = None,
    drop_last: bool = False,
) -> Curriculum:
    """Epochs over ``pool_ids``, reshuffled every epoch, cut into consecutive batches of ``batch_size``.

    Parameters
    ----------
    n_pool : size of the pool (the result's ``n_pool``).
    batch_size : entries per batch (>= 1).
    n_steps : exact number of steps of the result (>= 0); the last epoch is cut off where needed.
    seed : int, Generator or None, passed to ``np.random.default_rng``.
    pool_ids : (n_ids,) ids to iterate over, default ``arange(n_pool)``.
    drop_last : drop each epoch's last partial batch; otherwise it is a smaller (ragged) batch.

    Returns
    -------
    Curriculum with ``n_steps`` steps.
    """
    n_pool = _check_n_pool(n_pool)
    batch_size = _as_int(batch_size, "batch_size")
    n_steps = _as_int(n_steps, "n_steps")
    if batch_size < 1:
        raise CurriculumError(f"batch_size must be >= 1, got {batch_size}")
    if n_steps < 0:
        raise CurriculumError(f"n_steps must be >= 0, got {n_steps}")
    if pool_ids is None:
        pool_ids = np.arange(n_pool, dtype=np.int64)
    else:
        pool_ids = _as_int_array(pool_ids, "pool_ids")
        _check_ids(pool_ids, n_pool, "pool_ids")
    rng = np.random.default_rng(seed)
    if n_steps == 0:
        return Curriculum._trusted(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), n_pool)

    n_full, remainder = divmod(pool_ids.size, batch_size)
    epoch_sizes = [batch_size] * n_full + ([] if drop_last or remainder == 0 else [remainder])
    if not epoch_sizes:
        raise CurriculumError(
            f"an epoch over {pool_ids.size} ids has no batch of size {batch_size}"
            + (" with drop_last=True" if pool_ids.size else "")
        )
    epoch_sizes = np.array(epoch_sizes, dtype=np.int64)
    n_epochs = -(-n_steps // epoch_sizes.size)
    per_epoch = int(epoch_sizes.sum())
    orders = rng.permuted(np.broadcast_to(pool_ids, (n_epochs, pool_ids.size)), axis=1)[:, :per_epoch]
    sizes = np.tile(epoch_sizes, n_epochs)[:n_steps]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return Curriculum._trusted(offsets, orders.reshape(-1)[: offsets[-1]], n_pool)


def random_subset(
    n_pool: int,
    subset_size: int,
    batch_size: int,
    n_steps: int,
    seed: SeedLike = None,
    drop_last: bool = False,
) -> Curriculum:
    """Choose ``subset_size`` pool ids without replacement, then ``shuffled_epochs`` over that subset."""
    n_pool = _check_n_pool(n_pool)
    subset_size = _as_int(subset_size, "subset_size")
    if n_pool is None or not 1 <= subset_size <= n_pool:
        raise CurriculumError(f"subset_size must lie in [1, n_pool = {n_pool}], got {subset_size}")
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n_pool, size=subset_size, replace=False))
    return shuffled_epochs(n_pool, batch_size, n_steps, seed=rng, pool_ids=subset, drop_last=drop_last)


def random_curricula(
    n_curricula: int,
    n_pool: int,
    batch_size: int,
    n_steps: int,
    subset_size: int | None = None,
    seed: SeedLike = None,
    drop_last: bool = False,
) -> list[Curriculum]:
    """Independent random curricula: shuffled epochs over the whole pool, or over a fresh random subset each.

    One Generator made from ``seed`` draws a child seed per curriculum, so the list is reproducible and
    curriculum c does not depend on how many come after it.
    """
    n_curricula = _as_int(n_curricula, "n_curricula")
    if n_curricula < 0:
        raise CurriculumError(f"n_curricula must be >= 0, got {n_curricula}")
    rng = np.random.default_rng(seed)
    child_seeds = rng.integers(0, np.iinfo(np.int64).max, size=n_curricula)
    if subset_size is None:
        return [
            shuffled_epochs(n_pool, batch_size, n_steps, seed=int(child), drop_last=drop_last)
            for child in child_seeds
        ]
    return [
        random_subset(n_pool, subset_size, batch_size, n_steps, seed=int(child), drop_last=drop_last)
        for child in child_seeds
    ]


# ---------------------------------------------------------------------- many curricula at once


def stack_csr(
    curricula: Sequence[Curriculum], n_pool: int, n_steps: int | None = None
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Stack the count matrices of many curricula, each padded to the same number of steps.

    Parameters
    ----------
    curricula : the curricula, in order.
    n_pool : number of columns; every id must be < n_pool, and a curriculum's own n_pool must equal it.
    n_steps : rows per curriculum, default the longest curriculum's n_steps; a longer curriculum is an error.

    Returns
    -------
    counts : (n_curricula * n_steps_max, n_pool) float64 csr; row ``c * n_steps_max + (t - 1)`` counts the
        ids of curriculum c's step t, rows past a curriculum's end are empty.
    lengths : (n_curricula,) int64 n_steps of each curriculum.
    """
    n_pool = _check_n_pool(n_pool)
    if n_pool is None:
        raise CurriculumError("stack_csr needs n_pool")
    curricula = list(curricula)
    for index, curriculum in enumerate(curricula):
        if not isinstance(curriculum, Curriculum):
            raise CurriculumError(f"curricula[{index}] is a {type(curriculum).__name__}, not a Curriculum")
        if curriculum.n_pool is not None and curriculum.n_pool != n_pool:
            raise CurriculumError(f"curricula[{index}] has n_pool {curriculum.n_pool}, expected {n_pool}")
        if curriculum.n_pool is None:
            _check_ids(curriculum.ids, n_pool, f"curricula[{index}].ids")
    lengths = np.array([curriculum.n_steps for curriculum in curricula], dtype=np.int64)
    if n_steps is None:
        n_steps_max = int(lengths.max()) if lengths.size else 0
    else:
        n_steps_max = _as_int(n_steps, "n_steps")
        if n_steps_max < 0:
            raise CurriculumError(f"n_steps must be >= 0, got {n_steps_max}")
        too_long = np.flatnonzero(lengths > n_steps_max)
        if too_long.size:
            index = int(too_long[0])
            raise CurriculumError(
                f"curricula[{index}] has {int(lengths[index])} steps, more than n_steps = {n_steps_max}"
            )

    indptr_parts = [np.zeros(1, dtype=np.int64)]
    id_parts = []
    base = 0
    for curriculum in curricula:
        ends = np.full(n_steps_max, curriculum.n_entries, dtype=np.int64)
        ends[: curriculum.n_steps] = curriculum.offsets[1:]
        indptr_parts.append(ends + base)
        id_parts.append(curriculum.ids)
        base += curriculum.n_entries
    indptr = np.concatenate(indptr_parts)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
    counts = sp.csr_matrix(
        (np.ones(ids.size, dtype=np.float64), ids, indptr), shape=(len(curricula) * n_steps_max, n_pool)
    )
    counts.sum_duplicates()
    return counts, lengths
