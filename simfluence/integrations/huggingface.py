"""Log Hugging Face ``Trainer`` runs into a run set, and train a given curriculum with ``Trainer``.

Three pieces, usable apart or together:

- :class:`SimfluenceCallback` logs one run: per optimizer step the pool ids of the whole step (every
  gradient-accumulation micro-batch, and every data-parallel rank gathered on rank 0), the learning rate,
  and every ``log_every`` steps the per-example losses of a probe set (a
  :class:`~simfluence.integrations.probes.ProbeSet`), through a :class:`~simfluence.runlog.RunLogger`; the
  training arguments that decide the updates go into the run's metadata, and checkpoints at chosen steps into
  the run set (its format, for the gradient methods).
- The ids travel with the batch: :class:`~simfluence.integrations.sampler.IndexedDataset` adds each example's
  pool position under ``simfluence_id``, :class:`IdCollator` keeps that column through any collator, and a
  forward pre-hook on the model takes it out of the model's inputs (and reports it to the callback).
- :class:`CurriculumTrainer` is a ``Trainer`` that does all of that itself and, given a
  :class:`~simfluence.curriculum.Curriculum`, trains exactly that curriculum (one optimizer step per
  curriculum step) through :class:`~simfluence.integrations.sampler.CurriculumBatchSampler`.

:class:`TrainerTask` is a :class:`~simfluence.task.Task` whose runs are trained by ``Trainer``, so that
``generate_runs`` and ``verify`` retrain counterfactual curricula the way the logged runs were trained;
:meth:`TrainerTask.from_logged_run` builds it from what the callback recorded.

Needs the ``hf`` extra (``pip install 'simfluence[hf]'``: transformers and accelerate).

Data-parallel runs: ids are gathered with ``torch.distributed.gather_object`` (any backend); probe losses are
computed on rank 0 with the unwrapped model, so the full model must live on rank 0 (DDP, not FSDP/ZeRO-3).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, RunLogError, TaskError
from simfluence.integrations._recording import (
    IdTap,
    RecordingOptions,
    distributed_rank_and_size,
    write_checkpoint,
)
from simfluence.integrations.sampler import ID_COLUMN, CurriculumBatchSampler, IndexedDataset
from simfluence.runlog import MANIFEST, Run, RunLogger, RunSet
from simfluence.task import Task
from simfluence.training import CHECKPOINTS_DIR

try:
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
except ImportError as _error:  # one line naming the extra, not a traceback through transformers
    raise ImportError(
        f"simfluence.integrations.huggingface needs transformers ({_error}): pip install 'simfluence[hf]'"
    ) from None

__all__ = ["CurriculumTrainer", "IdCollator", "LoggedLearningRates", "SimfluenceCallback", "TrainerOptimizer",
           "TrainerTask", "training_arguments_of"]

# TrainingArguments that decide a run's updates; the callback records them (run metadata "training_arguments")
# and TrainerTask.from_logged_run trains with them
UPDATE_ARGUMENTS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "optim",
    "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps",
    "average_tokens_across_devices", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "seed",
    "per_device_train_batch_size",
)


def _json_value(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim)
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def training_arguments_of(args: TrainingArguments) -> dict:
    """The ``TrainingArguments`` that decide a run's updates (:data:`UPDATE_ARGUMENTS`), as JSON values.

    What :class:`SimfluenceCallback` records under the run's ``metadata["training_arguments"]`` and
    :meth:`TrainerTask.from_logged_run` trains with; the arguments this transformers version lacks are left out.
    """
    return {name: _json_value(getattr(args, name)) for name in UPDATE_ARGUMENTS if hasattr(args, name)}


class IdCollator:
    """Wrap a collator so that the id column of the examples survives it as a ``(batch,)`` int64 tensor.

    The ids are taken out of every example, the rest is collated by ``collator``, and the ids are put back
    under ``id_column``. Examples without the column are collated unchanged.

    Parameters
    ----------
    collator : ``collator(list_of_examples) -> dict``; default ``transformers.default_data_collator``.
    id_column : the column of pool positions (:class:`~simfluence.integrations.sampler.IndexedDataset` adds it).
    """

    def __init__(self, collator: Callable[[list], Any] | None = None, id_column: str = ID_COLUMN) -> None:
        self.collator = collator if collator is not None else default_data_collator
        self.id_column = id_column

    def __call__(self, features: list) -> Any:
        if not features or not isinstance(features[0], Mapping) or self.id_column not in features[0]:
            return self.collator(features)
        ids = torch.tensor([int(feature[self.id_column]) for feature in features], dtype=torch.long)
        rest = [{key: value for key, value in feature.items() if key != self.id_column} for feature in features]
        batch = self.collator(rest)
        batch[self.id_column] = ids
        return batch

    def __repr__(self) -> str:
        return f"IdCollator({self.collator!r}, id_column={self.id_column!r})"


@dataclasses.dataclass(eq=False)  # the options are RecordingOptions' fields, then checkpoint_steps
class SimfluenceCallback(RecordingOptions, TrainerCallback):
    """Log a ``Trainer`` run into a run set: each optimizer step's pool ids and learning rate, probe losses.

    The batches must carry their pool positions in ``id_column`` and the model must not receive it: use
    :class:`CurriculumTrainer`, or with a plain ``Trainer`` wrap the training set in
    :class:`~simfluence.integrations.sampler.IndexedDataset`, pass ``data_collator=IdCollator(...)`` and
    ``TrainingArguments(remove_unused_columns=False)``. The callback puts a forward pre-hook on the model that
    strips the column and records the ids of every training forward (micro-batch); at the end of each
    optimizer step the micro-batches of all ranks are gathered on rank 0 (``torch.distributed`` when
    initialised), which logs them as that step's batch. Step 0 holds the probe losses before training; they
    are logged again every ``log_every`` optimizer steps and at the last step. The learning rate of a step is
    the optimizer's at the start of the step (the rate its update used). The run is written on a background
    thread (a killed process loses at most the last ~50 ms of steps); a training that raises inside
    :class:`CurriculumTrainer` leaves the run ``aborted`` with every completed step readable.

    It takes the options of every run-logging callback (``runset``, ``run_name``, ``probe``, ..., ``id_column``;
    see :class:`~simfluence.integrations._recording.RecordingOptions`), here with ``probe(model)`` and
    ``metadata`` added to the run's (which records the training arguments that matter); then its own:

    Parameters
    ----------
    checkpoint_steps : optimizer steps after which rank 0 saves the model and optimizer state (0 = before
        training) in the run set's checkpoint format (``RUNSET/checkpoints/<run>/step-<t>.pt``, listed in the
        run's ``metadata["checkpoints"]``; see ``runs/README.md``), for ``tracin``, influence and ``blend``.
    """

    checkpoint_steps: Sequence[int] = ()

    def __post_init__(self) -> None:
        steps = [int(step) for step in self.checkpoint_steps]
        if any(step < 0 for step in steps):
            raise RunLogError(f"checkpoint step {min(steps)} is negative")
        super().__post_init__()
        self._checkpoint_steps = frozenset(steps)
        self._open_logger: RunLogger | None = None  # a logger opened by the caller (TrainerTask), else None
        self._optimizer: Any = None

    def _run_metadata(self, args: TrainingArguments, optimizer: Any) -> dict:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        groups = inner.param_groups if inner is not None else []
        return {
            "framework": "transformers", "transformers_version": transformers.__version__,
            "seed": args.seed, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "max_grad_norm": args.max_grad_norm, "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value",
                                                                                   args.lr_scheduler_type)),
            "optimizer": type(inner).__name__ if inner is not None else None, "log_every": self.log_every,
            # the largest weight decay of the optimizer's groups (Trainer exempts biases and norms)
            "weight_decay": max((float(group.get("weight_decay", 0.0)) for group in groups), default=None),
            "training_arguments": training_arguments_of(args),
            **(self.metadata or {}),
        }

    def _save_checkpoint(self, step: int, learning_rate: float | None, model: nn.Module) -> None:
        """Rank 0: write the state after ``step`` and list it in the run's metadata (committed with the next step)."""
        logger = self.recorder.logger
        if logger is None:
            return
        inner = getattr(self._optimizer, "optimizer", self._optimizer)
        path = write_checkpoint(logger.runset_path, logger.name, step, learning_rate, model, inner)
        logger.metadata["checkpoints"].append({"step": int(step), "path": path})

    def _logger(self, args: TrainingArguments, optimizer: Any, train_dataloader: Any) -> RunLogger:
        return self.open_logger(getattr(train_dataloader, "dataset", None), self._run_metadata(args, optimizer))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        rank, _ = distributed_rank_and_size()
        self._optimizer = optimizer
        if self._open_logger is not None:  # TrainerTask: the generator logged step 0 and saved its checkpoint
            logger = self._open_logger if rank == 0 else None
            if logger is not None:
                metadata = self._run_metadata(args, optimizer)
                logger.metadata.update({key: value for key, value in metadata.items() if key != "seed"})
                logger.metadata.setdefault("checkpoints", [])
            self.recorder.start(model, logger, self.id_column, log_initial=False)
            return
        logger = self._logger(args, optimizer, train_dataloader) if rank == 0 else None
        if logger is not None:
            logger.metadata["checkpoints"] = []  # before the writer thread starts: only appended to afterwards
            stale = Path(logger.runset_path) / CHECKPOINTS_DIR / logger.name  # of a run this one overwrites
            if stale.is_dir():
                shutil.rmtree(stale)
        self.recorder.start(model, logger, self.id_column)
        if 0 in self._checkpoint_steps:
            first_rate = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
            self._save_checkpoint(0, first_rate, model)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._learning_rate = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.recorder.end_step(state.global_step, self._learning_rate, model)
        if state.global_step in self._checkpoint_steps:
            self._save_checkpoint(state.global_step, self._learning_rate, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.recorder.finish(model, close=self._open_logger is None)

    def abort(self) -> None:
        """After a failed training: wait for the queued writes and mark the run ``aborted`` (its prefix stays).

        ``Trainer`` has no event for a failure; :class:`CurriculumTrainer` calls this when ``train`` raises.
        """
        logger = self.recorder.logger
        self.recorder.abandon()
        if logger is not None and self._open_logger is None:
            logger.close("aborted")


class _StripIds(TrainerCallback):
    """Put the id-stripping hook on the model ``Trainer`` trains (it may come from ``model_init``)."""

    def __init__(self, id_column: str) -> None:
        self.id_column = id_column

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        IdTap.on(model, self.id_column)


class CurriculumTrainer(Trainer):
    """A ``Trainer`` whose batches carry their pool ids and that can train a given curriculum.

    The training set is wrapped in :class:`~simfluence.integrations.sampler.IndexedDataset` (unless it is one
    already), the collator in :class:`IdCollator`, the id column is kept when ``remove_unused_columns`` drops
    the others, and a forward pre-hook removes it before the model's forward. So a
    :class:`SimfluenceCallback` logs the ids with no further setup.

    With ``curriculum``, training is one pass over it: curriculum step t is optimizer step t, cut into
    ``gradient_accumulation_steps`` micro-batches on each of ``world_size`` ranks (see
    :class:`~simfluence.integrations.sampler.CurriculumBatchSampler`); ``per_device_train_batch_size``,
    ``num_train_epochs`` and the sampling options are not used, ``max_steps`` becomes the curriculum's length.

    Parameters
    ----------
    *args, **kwargs : as for ``transformers.Trainer``.
    curriculum : the curriculum to train (ids are positions in ``train_dataset``), or None for the usual
        sampling.
    id_column : the batch column of pool positions.
    """

    def __init__(self, *args: Any, curriculum: Curriculum | None = None, id_column: str = ID_COLUMN,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id_column = id_column
        self.curriculum = curriculum
        if self.train_dataset is not None and not isinstance(self.train_dataset, IndexedDataset):
            self.train_dataset = IndexedDataset(self.train_dataset, id_column)
        if not isinstance(self.data_collator, IdCollator):
            self.data_collator = IdCollator(self.data_collator, id_column)
        self.add_callback(_StripIds(id_column))
        if self.model is not None:
            IdTap.on(self.model, id_column)
        if curriculum is not None:
            if not isinstance(curriculum, Curriculum):
                raise CurriculumError(f"curriculum must be a Curriculum, got a {type(curriculum).__name__}")
            if self.train_dataset is None:
                raise CurriculumError("CurriculumTrainer: a curriculum needs a train_dataset to index")
            if curriculum.ids.size and int(curriculum.ids.max()) >= len(self.train_dataset):
                raise CurriculumError(f"the curriculum uses pool id {int(curriculum.ids.max())}, but train_dataset "
                                      f"has {len(self.train_dataset)} examples")
            if self.args.max_steps > 0 and self.args.max_steps != curriculum.n_steps:
                raise CurriculumError(f"TrainingArguments.max_steps={self.args.max_steps} but the curriculum has "
                                      f"{curriculum.n_steps} steps (leave max_steps unset)")
            self.args = copy.copy(self.args)  # the caller's arguments stay as they were
            self.args.max_steps = curriculum.n_steps

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; if it raises, every :class:`SimfluenceCallback` marks its run ``aborted``."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, SimfluenceCallback):
                    callback.abort()
            raise

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.id_column not in self._signature_columns:
            self._signature_columns.append(self.id_column)

    def curriculum_sampler(self) -> CurriculumBatchSampler:
        """The batch sampler of ``curriculum``: ``gradient_accumulation_steps * world_size`` chunks per step.

        ``Trainer`` (accelerate) hands batch i to rank ``i % world_size``, so each rank gets its
        ``gradient_accumulation_steps`` micro-batches of every step.
        """
        chunks = self.args.gradient_accumulation_steps * max(self.args.world_size, 1)
        return CurriculumBatchSampler(self.curriculum, micro_batches=chunks)

    def get_train_dataloader(self) -> DataLoader:
        if self.curriculum is None:
            return super().get_train_dataloader()
        collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.curriculum_sampler(), collate_fn=collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(loader)


# ------------------------------------------------------------------------------------------ Task
STEP_LOSSES = ("trainer", "examples")


class _LearningRateOf:
    """LambdaLR factor for optimizer groups whose base rate is 1: the task's rate of step ``k + 1``."""

    def __init__(self, lr_at: Callable[[int], float]) -> None:
        self.lr_at = lr_at

    def __call__(self, scheduler_step: int) -> float:
        return float(self.lr_at(scheduler_step + 1))


@dataclasses.dataclass(frozen=True)
class LoggedLearningRates:
    """``lr_at`` of a logged run: the rate its step t logged; steps past its end keep the last rate.

    Attributes
    ----------
    rates : (n_steps,) learning rate of steps 1..n_steps.
    """

    rates: tuple[float, ...]

    def __call__(self, step: int) -> float:
        if not self.rates:
            raise TaskError("LoggedLearningRates holds no rates")
        return float(self.rates[min(max(int(step), 1), len(self.rates)) - 1])


@dataclasses.dataclass(frozen=True)
class TrainerOptimizer:
    """``make_optimizer`` of a :class:`TrainerTask` whose runs use the optimizer ``Trainer`` builds itself.

    When a :class:`TrainerTask` trains, ``Trainer.create_optimizer`` builds it from the training arguments
    (``optim``, ``learning_rate``, ``weight_decay`` on all but biases and norms, Adam's betas and epsilon), as
    in a logged ``Trainer`` run. Called on parameters (by code outside ``Trainer``) it gives the same optimizer
    class with the same hyper-parameters, the weight decay on every parameter (it is given no names).

    Attributes
    ----------
    training_kwargs : ``TrainingArguments`` keywords (the others keep ``TrainingArguments``' defaults).
    """

    training_kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        with tempfile.TemporaryDirectory(prefix="simfluence-args-") as output_dir:
            args = TrainingArguments(**{**self.training_kwargs, "output_dir": output_dir, "report_to": "none"})
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        return optimizer_class([{"params": list(params), "weight_decay": args.weight_decay}], **optimizer_kwargs)


class _TensorPool(torch.utils.data.Dataset):
    """Row i of a task's pool tensors as the example ``{input_name: inputs[i], label_name: targets[i]}``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, input_name: str, label_name: str) -> None:
        self.inputs, self.targets = inputs, targets
        self.input_name, self.label_name = input_name, label_name

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict:
        return {self.input_name: self.inputs[index], self.label_name: self.targets[index]}


def _stack(features: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(feature[key]) for feature in features]) for key in features[0]}


class _TaskTrainer(CurriculumTrainer):
    """Trains a Task's model on its step loss, with the task's learning rates.

    ``step_loss="trainer"``: ``Trainer``'s own ``compute_loss`` (the model's loss given ``labels``; for causal
    LMs the sum over the step's tokens divided by their count, ``num_items_in_batch``, across all
    micro-batches), exactly as a logged ``Trainer`` run. ``step_loss="examples"``: ``loss_fn(model(inputs),
    targets)`` with a micro-batch's mean weighted by its share of the step (``n_micro * chunks / step_size``), so
    that after ``Trainer`` divides by the accumulation steps and DDP averages over ranks, the gradient is that
    of the mean loss over the step's examples, as in the plain loop of ``generate_runs``, for any split.
    The scheduler sets the rate of step t to ``task.lr_at(t)`` on an optimizer ``Trainer`` built or the task's.
    """

    def __init__(self, *args: Any, task: TrainerTask, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task = task
        if task.step_loss == "examples":
            self.model_accepts_loss_kwargs = False  # the loss below is a micro-batch mean: Trainer divides by GA

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            for group in optimizer.param_groups:
                group["lr"] = 1.0  # LambdaLR then sets lr_at(step) itself
                group.pop("initial_lr", None)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LearningRateOf(self.task.lr_at))
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.task.step_loss == "trainer":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids = inputs.get(self.id_column)
        extra = {self.id_column: ids} if ids is not None else {}  # stripped (and recorded) by the id tap
        outputs = model(inputs[self.task.input_name], **extra)
        losses = self.task.loss_fn(outputs, inputs[self.task.label_name])
        loss = losses.mean()
        if model.training and self.curriculum is not None:
            step_size = int(self.curriculum.batch_sizes[self.state.global_step])
            chunks = self.args.gradient_accumulation_steps * max(self.args.world_size, 1)
            loss = loss * (losses.numel() * chunks / step_size)
        return (loss, outputs) if return_outputs else loss


def _requested_checkpoints(runset_path: os.PathLike) -> frozenset[int]:
    """The checkpoint steps ``generate_runs`` recorded in the run set's manifest (``generator.checkpoint_steps``)."""
    try:
        manifest = json.loads((Path(runset_path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return frozenset()
    steps = ((manifest.get("metadata") or {}).get("generator") or {}).get("checkpoint_steps") or []
    return frozenset(int(step) for step in steps)


@dataclasses.dataclass(eq=False)
class TrainerTask(Task):
    """A :class:`~simfluence.task.Task` whose runs ``generate_runs`` trains with ``transformers.Trainer``.

    Every curriculum step is one optimizer step of a :class:`CurriculumTrainer`; ``Trainer`` adds what
    ``training_kwargs`` configure (gradient accumulation, ``max_grad_norm`` — ``Trainer``'s default 1.0 unless
    set —, mixed precision, devices, distributed training, ...). The model is ``make_model(init_seed)``, the rate
    of step t is ``lr_at(t)``; the optimizer is ``make_optimizer(params)``, or, with a :class:`TrainerOptimizer`,
    the one ``Trainer`` builds from the training arguments. The loss of a step is ``step_loss``:

    - ``"trainer"`` (default): what ``Trainer`` computes — the model's own loss given ``labels`` (``label_name``),
      for causal LMs the mean over the step's tokens (``labels != -100``), all micro-batches together. A logged
      :class:`CurriculumTrainer` run is reproduced by :meth:`from_logged_run`.
    - ``"examples"``: the mean of ``loss_fn(model(inputs), targets)`` over the step's examples, the plain loop
      of ``generate_runs`` (with ``max_grad_norm=0`` a run equals the plain loop's to float tolerance).

    ``loss_fn`` still gives the per-example test losses that are logged, and the gradients of the attribution
    methods. Pool inputs are passed as one tensor (``input_name``): pad sequences on the right and set the labels
    of padding to -100 (a causal LM then computes every real token as with an attention mask).
    ``generate_runs(..., checkpoint_steps=...)`` saves checkpoints in the run set's format.

    Attributes
    ----------
    training_kwargs : keyword arguments of ``transformers.TrainingArguments`` (picklable, for worker
        processes). ``output_dir`` (a temporary folder), ``max_steps``, ``seed`` (the run's), ``save_strategy``
        ("no") and ``report_to`` ("none") are set per run.
    input_name, label_name : names of the pool inputs and targets in the Trainer's batches.
    step_loss : ``"trainer"`` or ``"examples"`` (above).
    """

    training_kwargs: dict = dataclasses.field(default_factory=dict)
    input_name: str = "input_ids"
    label_name: str = "labels"
    step_loss: str = "trainer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_loss not in STEP_LOSSES:
            raise TaskError(f"TrainerTask: step_loss must be one of {STEP_LOSSES}, got {self.step_loss!r}")

    @classmethod
    def from_logged_run(cls, runset: RunSet | str | os.PathLike, run: int | str = 0, **fields: Any) -> TrainerTask:
        """The TrainerTask that retrains ``run`` as :class:`CurriculumTrainer` trained it when it was logged.

        From the run's metadata (written by :class:`SimfluenceCallback`): ``training_kwargs`` (its
        ``training_arguments``), ``init_seed`` (its ``seed``: ``Trainer`` seeds before ``model_init``),
        ``make_optimizer`` (a :class:`TrainerOptimizer`: the optimizer ``Trainer`` built) and ``lr_at`` (the rates
        the run logged, :class:`LoggedLearningRates`); pool and test ids are the run set's.

        Parameters
        ----------
        runset : the run set (or its folder).
        run : the run (position or name) whose arguments to use.
        **fields : the other fields of the task (``make_model``, ``pool_inputs``, ``pool_targets``,
            ``test_inputs``, ``test_targets``, ``loss_fn``, ...), and any of the above to override.
            ``make_model(seed)`` must build the model as the run's ``model_init`` did after ``set_seed(seed)``.

        Raises
        ------
        TaskError : the run records no training arguments (it was not logged by :class:`SimfluenceCallback`),
            or logged no learning rate.
        """
        runset = runset if isinstance(runset, RunSet) else RunSet.load(runset)
        logged: Run = runset[run]
        arguments = logged.metadata.get("training_arguments")
        if not isinstance(arguments, dict):
            raise TaskError(f"run {logged.name!r} of {str(runset.path)!r} records no training arguments (log it with "
                            "SimfluenceCallback, or build the TrainerTask with training_kwargs)")
        rates = logged.known_learning_rates
        if rates is None or rates.size == 0:
            raise TaskError(f"run {logged.name!r} of {str(runset.path)!r} has steps without a logged learning rate")
        training_kwargs = {key: value for key, value in arguments.items() if key != "seed"}
        defaults = {
            "training_kwargs": training_kwargs, "make_optimizer": TrainerOptimizer(training_kwargs),
            "lr_at": LoggedLearningRates(tuple(float(rate) for rate in rates)),
            "init_seed": int(logged.metadata.get("seed", arguments.get("seed", 0))),
            "pool_ids": list(runset.pool_ids), "test_ids": list(runset.test_ids),
        }
        return cls(**{**defaults, **fields})

    def check_curricula(self, curricula: Sequence[Curriculum]) -> None:
        """Refuse, before any training, a curriculum ``Trainer`` cannot train: one with an empty step.

        Raises
        ------
        TaskError : naming the curriculum (its position) and the step.
        """
        for index, curriculum in enumerate(curricula):
            empty = np.flatnonzero(np.asarray(curriculum.batch_sizes) == 0)
            if empty.size:
                raise TaskError(f"curricula[{index}]: a TrainerTask cannot train step {int(empty[0]) + 1}, it is "
                                "empty (Trainer has no optimizer step without examples)")

    def training_arguments(self, output_dir: str, n_steps: int, seed: int) -> TrainingArguments:
        """The ``TrainingArguments`` of one run of ``n_steps`` steps."""
        options = {"disable_tqdm": True, "logging_strategy": "no", "use_cpu": not torch.cuda.is_available(),
                   **self.training_kwargs}
        options.update(output_dir=output_dir, max_steps=n_steps, seed=seed, save_strategy="no", report_to="none")
        return TrainingArguments(**options)

    def test_losses(self, model: nn.Module) -> np.ndarray:
        """(n_test,) float64 ``loss_fn(model(test_inputs), test_targets)`` in evaluation mode, on the model's device."""
        device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = self.loss_fn(model(self.test_inputs.to(device)), self.test_targets.to(device))
        finally:
            model.train(was_training)
        return losses.detach().to(torch.float64).cpu().numpy().reshape(-1)

    def train_logged_run(self, model: nn.Module, curriculum: Curriculum, logger: RunLogger, log_every: int,
                         seed: int) -> None:
        """Train ``model`` on ``curriculum`` with ``Trainer``, logging steps 1 and on into ``logger``.

        The hook :func:`~simfluence.training.generate_runs` calls instead of its plain loop, after
        logging the initial losses (and saving the checkpoint of step 0). The checkpoints of later steps that
        the run set's generator settings ask for are saved as :class:`SimfluenceCallback` saves them. The model
        is back on the CPU afterwards.
        """
        if curriculum.n_steps == 0:
            return
        self.check_curricula([curriculum])
        optimizer = None if isinstance(self.make_optimizer, TrainerOptimizer) else self.make_optimizer(
            model.parameters())
        checkpoint_steps = sorted(step for step in _requested_checkpoints(logger.runset_path) if step > 0)
        callback = SimfluenceCallback(logger.runset_path, logger.name, probe=self.test_losses, log_every=log_every,
                                      checkpoint_steps=checkpoint_steps)
        callback._open_logger = logger
        try:
            with tempfile.TemporaryDirectory(prefix="simfluence-trainer-") as output_dir:
                trainer = _TaskTrainer(
                    model=model, args=self.training_arguments(output_dir, curriculum.n_steps, seed),
                    train_dataset=_TensorPool(self.pool_inputs, self.pool_targets, self.input_name, self.label_name),
                    data_collator=_stack, optimizers=(optimizer, None), callbacks=[callback],
                    curriculum=curriculum, task=self,
                )
                for quiet in (PrinterCallback, ProgressCallback):  # generate_runs shows its own progress
                    trainer.remove_callback(quiet)
                trainer.train()
        finally:
            model.cpu()  # generate_runs evaluates and resets the model on the CPU
