"""Log Lightning training runs into a run set with :class:`SimfluenceLightningCallback`.

Lightning hands every training batch to its callbacks, so the pool ids are read from the batch itself
(:func:`~simfluence.integrations.sampler.batch_ids`: the ``simfluence_id`` column of a dict batch, the last
element of a tuple batch, as :class:`~simfluence.integrations.sampler.IndexedDataset` produces). The callback
logs per optimizer step the ids of all its micro-batches (``accumulate_grad_batches``; data-parallel ranks
gathered on rank 0 with ``torch.distributed``), the learning rate, and every ``log_every`` steps the probe
losses. To train a given curriculum, give the Trainer a
:func:`~simfluence.integrations.sampler.curriculum_dataloader` with ``micro_batches=accumulate_grad_batches``
and ``max_epochs=1``; under DDP also ``num_replicas``/``rank`` and ``use_distributed_sampler=False``.

Needs the ``lightning`` extra (``pip install 'simfluence[lightning]'``); ``lightning.pytorch`` is used, else
``pytorch_lightning``. The callback must come from the same package as the Trainer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from simfluence.integrations._recording import RecordingOptions, distributed_rank_and_size
from simfluence.integrations.sampler import batch_ids
from simfluence.runlog import RunLogger

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as _error:  # one line naming the extra, not a traceback
        raise ImportError(
            f"simfluence.integrations.lightning needs lightning ({_error}): pip install 'simfluence[lightning]'"
        ) from None

__all__ = ["SimfluenceLightningCallback"]


@dataclass(eq=False)
class SimfluenceLightningCallback(RecordingOptions, pl.Callback):
    """Log a Lightning run into a run set: each optimizer step's pool ids and learning rate, probe losses.

    Step 0 holds the probe losses before training; they are logged again every ``log_every`` optimizer steps
    and at the last step. The learning rate of a step is the first parameter group's when its optimizer steps.
    Probe losses are computed on rank 0 with the LightningModule (the full model must be on rank 0).

    It takes the options of every run-logging callback (``runset``, ``run_name``, ``probe``, ..., ``id_column``;
    see :class:`~simfluence.integrations._recording.RecordingOptions`), here with ``probe(pl_module)``, e.g.
    ``lambda module: probe_set(module.model)`` with a :class:`~simfluence.integrations.probes.ProbeSet`, and
    ``id_column`` read from dict batches; then its own:

    Parameters
    ----------
    ids_of : ``ids_of(batch) -> (batch,)`` pool positions of a training batch; default
        :func:`~simfluence.integrations.sampler.batch_ids` with ``id_column``.
    """

    ids_of: Callable[[Any], np.ndarray] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._global_step = 0

    def _logger(self, trainer: pl.Trainer) -> RunLogger:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metadata = {
            "framework": "lightning", "lightning_version": pl.__version__,
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "world_size": trainer.world_size,
            "gradient_clip_val": trainer.gradient_clip_val, "log_every": self.log_every,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None, **(self.metadata or {}),
        }
        return self.open_logger(getattr(trainer.train_dataloader, "dataset", None), metadata)

    def on_train_start(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        rank, _ = distributed_rank_and_size()
        self._global_step = trainer.global_step
        self.recorder.start(pl_module, self._logger(trainer) if rank == 0 else None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        ids_of = self.ids_of if self.ids_of is not None else lambda batch: batch_ids(batch, self.id_column)
        self.recorder.add_micro_batch(ids_of(batch))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: nn.Module, optimizer: Any) -> None:
        self._learning_rate = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > self._global_step:  # this batch ended an optimizer step
            self._global_step = trainer.global_step
            self.recorder.end_step(trainer.global_step, self._learning_rate, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        self.recorder.finish(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: nn.Module, exception: BaseException) -> None:
        """Wait for the queued writes and mark the run ``aborted`` (every completed step stays readable)."""
        logger = self.recorder.logger
        self.recorder.abandon()
        if logger is not None:
            logger.close("aborted")
