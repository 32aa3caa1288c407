"""Plug simfluence into the trainers people use: any DataLoader, Hugging Face ``Trainer``, Lightning.

- :mod:`simfluence.integrations.sampler` (torch only): :class:`CurriculumBatchSampler` makes a DataLoader train
  exactly a given curriculum, step by step (with gradient-accumulation micro-batches and data-parallel
  ranks); :class:`IndexedDataset` keeps each example's pool position in its batch.
- :mod:`simfluence.integrations.probes` (torch only): per-example losses of a probe set
  (:class:`ProbeSet`, :func:`causal_lm_losses`, :func:`classification_losses`).
- :mod:`simfluence.integrations.huggingface` (extra ``hf``): ``SimfluenceCallback``, ``CurriculumTrainer``,
  ``IdCollator``, ``TrainerTask``.
- :mod:`simfluence.integrations.lightning` (extra ``lightning``): ``SimfluenceLightningCallback``.

The framework modules are imported only when used; without their extra they fail with one line naming it.
"""
from __future__ import annotations

from simfluence.integrations.probes import ProbeSet, causal_lm_losses, classification_losses
from simfluence.integrations.sampler import (
    ID_COLUMN,
    CurriculumBatchSampler,
    IndexedDataset,
    batch_ids,
    curriculum_dataloader,
)

__all__ = [
    "ID_COLUMN",
    "CurriculumBatchSampler",
    "IndexedDataset",
    "ProbeSet",
    "batch_ids",
    "causal_lm_losses",
    "classification_losses",
    "curriculum_dataloader",
]
