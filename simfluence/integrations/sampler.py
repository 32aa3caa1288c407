"""Feed a given curriculum to any torch DataLoader, and keep each example's pool position in its batch.

A :class:`~simfluence.curriculum.Curriculum` says which pool positions form the batch of every training step.
:class:`CurriculumBatchSampler` is the batch sampler that makes a ``DataLoader`` (and so Hugging Face
``Trainer``, Lightning or a hand-written loop) train exactly that curriculum, step by step: step t's batch,
or with gradient accumulation its micro-batches, in order. Random orders come from the curriculum
generators (:func:`~simfluence.curriculum.shuffled_epochs`, :func:`~simfluence.curriculum.random_subset`,
:func:`~simfluence.curriculum.random_curricula`), counterfactual ones from the curriculum's edits.

:class:`IndexedDataset` adds the pool position of every example to the example itself, so that the ids of
each batch can be logged whatever sampler chose them. Nothing here imports a training framework.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError

__all__ = ["ID_COLUMN", "CurriculumBatchSampler", "IndexedDataset", "batch_ids", "curriculum_dataloader"]

ID_COLUMN = "simfluence_id"  # default name of the pool-position column of a batch


class CurriculumBatchSampler(Sampler[list[int]]):
    """Batch sampler that yields the batches of a curriculum, step 1 first, as lists of pool positions.

    With ``micro_batches=k`` and ``num_replicas=P`` every step's batch is cut into ``k * P`` consecutive chunks
    (``numpy.array_split``: sizes differ by at most one, larger first); chunk ``m * P + r`` is micro-batch m of
    replica (data-parallel rank) r, and this sampler yields the k chunks of its ``rank``. So one optimizer step
    of a trainer that accumulates k micro-batches on each of P ranks consumes exactly one curriculum step, and
    the ids of the step are all of its micro-batches. Hugging Face ``Trainer`` shards a batch sampler itself
    (batch i to rank ``i % P``): give it ``micro_batches=k * P, num_replicas=1``, which yields the same chunks
    in the same order (:class:`~simfluence.integrations.huggingface.CurriculumTrainer` does this).

    Parameters
    ----------
    curriculum : the curriculum to train; its ids are positions in the dataset the DataLoader reads.
    micro_batches : micro-batches per step and replica (gradient-accumulation steps), >= 1.
    num_replicas : data-parallel ranks sharing every step, >= 1.
    rank : this replica, in ``0 .. num_replicas - 1``.

    Raises
    ------
    CurriculumError : a step has fewer examples than the ``micro_batches * num_replicas`` chunks it is cut
        into (a trainer cannot take an empty micro-batch; the message names the step), or a bad argument.

    Examples
    --------
    >>> curriculum = shuffled_epochs(n_pool=len(dataset), batch_size=8, n_steps=100, seed=0)
    >>> loader = DataLoader(dataset, batch_sampler=CurriculumBatchSampler(curriculum))
    """

    def __init__(self, curriculum: Curriculum, micro_batches: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        if not isinstance(curriculum, Curriculum):
            raise CurriculumError(f"CurriculumBatchSampler needs a Curriculum, got a {type(curriculum).__name__}")
        for name, value in (("micro_batches", micro_batches), ("num_replicas", num_replicas)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise CurriculumError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 0 <= rank < num_replicas:
            raise CurriculumError(f"rank must be an integer in [0, {num_replicas}), got {rank!r}")
        self.curriculum = curriculum
        self.micro_batches = int(micro_batches)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        chunks = self.micro_batches * self.num_replicas
        too_small = np.flatnonzero(curriculum.batch_sizes < chunks)
        if too_small.size:
            step = int(too_small[0]) + 1
            raise CurriculumError(
                f"step {step} of the curriculum has {int(curriculum.batch_sizes[step - 1])} example(s), fewer than "
                f"the {chunks} micro-batches ({self.micro_batches} per replica x {self.num_replicas} replicas) it "
                "would be cut into; a trainer cannot take an empty micro-batch"
            )

    def __len__(self) -> int:
        return self.curriculum.n_steps * self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        chunks = self.micro_batches * self.num_replicas
        offsets, ids = self.curriculum.offsets, self.curriculum.ids
        for step in range(self.curriculum.n_steps):
            start, size = int(offsets[step]), int(offsets[step + 1] - offsets[step])
            sizes = size // chunks + (np.arange(chunks) < size % chunks)  # numpy.array_split: larger chunks first
            bounds = start + np.concatenate([[0], np.cumsum(sizes)])
            for micro in range(self.micro_batches):
                chunk = micro * self.num_replicas + self.rank
                yield ids[bounds[chunk] : bounds[chunk + 1]].tolist()

    def step_of(self, index: int) -> int:
        """The 1-based curriculum step of the ``index``-th batch this sampler yields (0-based)."""
        return index // self.micro_batches + 1

    def __repr__(self) -> str:
        return (f"CurriculumBatchSampler({self.curriculum!r}, micro_batches={self.micro_batches}, "
                f"num_replicas={self.num_replicas}, rank={self.rank})")


class IndexedDataset(Dataset):
    """A map-style dataset whose examples carry their own position (the pool id that curricula use).

    Example ``i`` of ``dataset`` comes back with ``i`` added: a mapping (a Hugging Face feature dict) gets the
    key ``id_column``; a tuple or list gets ``i`` appended; anything else becomes ``(example, i)``. A
    DataLoader's default collation then gives each batch a ``(batch,)`` tensor of pool positions.

    Parameters
    ----------
    dataset : any map-style dataset (``__getitem__`` and ``__len__``).
    id_column : key of the position in mapping examples.
    """

    def __init__(self, dataset: Any, id_column: str = ID_COLUMN) -> None:
        self.dataset = dataset
        self.id_column = id_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        example = self.dataset[index]
        index = int(index)
        if isinstance(example, Mapping):
            return {**example, self.id_column: index}
        if isinstance(example, tuple | list):
            return (*example, index)
        return example, index


def batch_ids(batch: Any, id_column: str = ID_COLUMN) -> np.ndarray:
    """(batch,) int64 pool positions of a collated batch of an :class:`IndexedDataset`.

    The positions are ``batch[id_column]`` for a mapping batch, the last element of a tuple or list batch.
    """
    if isinstance(batch, Mapping):
        if id_column not in batch:
            raise KeyError(f"the batch has no id column {id_column!r} (keys: {', '.join(map(str, batch))}); "
                           "wrap the dataset in simfluence.integrations.IndexedDataset")
        ids = batch[id_column]
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes) and len(batch):
        ids = batch[-1]
    else:
        raise TypeError(f"cannot find example ids in a batch of type {type(batch).__name__}")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def curriculum_dataloader(
    dataset: Any,
    curriculum: Curriculum,
    micro_batches: int = 1,
    num_replicas: int = 1,
    rank: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over ``dataset`` that yields the (micro-)batches of ``curriculum`` in order.

    Parameters
    ----------
    dataset : map-style dataset; curriculum id i is ``dataset[i]``.
    curriculum : the steps to train; every id must be < ``len(dataset)``.
    micro_batches, num_replicas, rank : as for :class:`CurriculumBatchSampler`.
    **loader_kwargs : further DataLoader arguments (``collate_fn``, ``num_workers``, ...), not ``batch_size``,
        ``shuffle``, ``sampler`` or ``drop_last``, which the batch sampler replaces.

    Returns
    -------
    DataLoader of ``curriculum.n_steps * micro_batches`` batches.
    """
    if curriculum.ids.size and int(curriculum.ids.max()) >= len(dataset):
        raise CurriculumError(f"the curriculum uses pool id {int(curriculum.ids.max())}, but the dataset has "
                              f"{len(dataset)} examples")
    sampler = CurriculumBatchSampler(curriculum, micro_batches=micro_batches, num_replicas=num_replicas, rank=rank)
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
