"""The framework-free core of the trainer callbacks: which pool ids each optimizer step used, logged on rank 0.

:class:`IdTap` is a forward pre-hook on the model: it takes the id column out of the keyword inputs of every
forward call (so the model never sees it) and, while the model trains with gradients on, hands the ids of
that forward (one micro-batch) to the :class:`StepRecorder` listening. The recorder collects the micro-batches
of each optimizer step on every data-parallel rank, gathers them on rank 0 (``torch.distributed.gather_object``
when a process group is initialised; once every ``log_every`` steps, not every step), and rank 0 writes each
step with its learning rate, and every ``log_every`` steps the probe losses, through a
:class:`~simfluence.runlog.RunLogger`, on a background thread (the probe itself is evaluated in the training
thread). The Hugging Face and Lightning callbacks only translate their
framework's events into :meth:`StepRecorder.start`, :meth:`~StepRecorder.end_step` and
:meth:`~StepRecorder.finish`; the options both take (where to log, what to probe, which ids) are defined once,
in :class:`RecordingOptions`, the dataclass both derive from.
"""
from __future__ import annotations

import collections
import io
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simfluence._io import atomic_write_bytes
from simfluence.errors import RunLogError
from simfluence.integrations.sampler import ID_COLUMN
from simfluence.runlog import RunLogger, RunSet
from simfluence.training import CHECKPOINTS_DIR

ProbeFn = Callable[[nn.Module], np.ndarray]

_TAPS: weakref.WeakKeyDictionary[nn.Module, dict[str, IdTap]] = weakref.WeakKeyDictionary()


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_on_rank0(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (a picklable object), in rank order, on rank 0; None on the other ranks.

    A collective: every rank of the default process group must call it. Without one, ``[value]``.
    """
    rank, world_size = distributed_rank_and_size()
    if world_size == 1:
        return [value]
    gathered = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def as_ids(ids: Any) -> np.ndarray:
    """(n,) int64 copy of a tensor, array or list of pool ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.array(ids, dtype=np.int64).reshape(-1)


class IdTap:
    """Forward pre-hook that strips ``id_column`` from a model's keyword inputs and reports the ids it saw.

    One tap per (model, column), made by :meth:`on`; it stays on the model (stripping the column is always
    needed once batches carry it). Ids are reported to the listeners only for forward calls made in training
    mode with gradients enabled, i.e. training micro-batches, not evaluation or probe passes.
    """

    def __init__(self, id_column: str) -> None:
        self.id_column = id_column
        self.listeners: list[Callable[[np.ndarray], None]] = []

    @classmethod
    def on(cls, model: nn.Module, id_column: str) -> IdTap:
        """The tap of ``model`` for ``id_column``, registered as a forward pre-hook the first time."""
        taps = _TAPS.setdefault(model, {})
        if id_column not in taps:
            tap = cls(id_column)
            model.register_forward_pre_hook(tap, with_kwargs=True)
            taps[id_column] = tap
        return taps[id_column]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.id_column not in kwargs:
            return None
        kwargs = dict(kwargs)
        ids = kwargs.pop(self.id_column)
        if module.training and torch.is_grad_enabled() and self.listeners:
            ids = as_ids(ids)
            for listener in self.listeners:
                listener(ids)
        return args, kwargs


def probe_test_ids(probe: ProbeFn, test_ids: Any) -> Any:
    """``test_ids`` if given, else ``range(len(probe))``; a probe without a length needs them."""
    if test_ids is not None:
        return test_ids
    try:
        return range(len(probe))
    except TypeError:
        raise RunLogError(f"the probe {probe!r} has no len(): pass test_ids (one id per probe loss)") from None


def open_run_logger(runset: Any, run_name: str, probe: ProbeFn, *, n_pool: int | None, pool_ids: Any,
                    test_ids: Any, dataset: Any, runset_metadata: dict | None, metadata: dict,
                    overwrite: bool, who: str) -> RunLogger:
    """Create (or reuse) the run set and open the run's logger, for a callback named ``who``.

    The pool size is ``n_pool``, else ``len(pool_ids)``, else the length of the training ``dataset``.
    """
    if n_pool is None:
        if pool_ids is not None:
            n_pool = len(pool_ids)
        elif dataset is not None:
            n_pool = len(dataset)
        else:
            raise TypeError(f"{who} cannot tell the pool size from the training dataloader; pass n_pool")
    RunSet.create(runset, n_pool=n_pool, pool_ids=pool_ids, test_ids=probe_test_ids(probe, test_ids),
                  metadata=runset_metadata, exist_ok=True)
    return RunLogger(runset, run_name, metadata=metadata, overwrite=overwrite)


def optimizer_state_in_parameter_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameter positions renumbered to ``model.named_parameters()`` order.

    A state dict numbers the parameters in the order the optimizer got them, group after group; ``Trainer``
    puts the decayed parameters in one group and the others (biases, norms) in another, so its positions are
    not the model's. The run set's checkpoints promise the model's order (what the gradient methods read), so
    the positions are mapped through the parameters themselves. Parameters the model does not name keep no
    state (they cannot be addressed by a model position).
    """
    state = optimizer.state_dict()
    position_of = {id(parameter): position for position, (_, parameter) in enumerate(model.named_parameters())}
    renumber = {}
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
        for parameter, saved in zip(group["params"], saved_group["params"], strict=True):
            if id(parameter) in position_of:
                renumber[saved] = position_of[id(parameter)]
    return {
        "state": {renumber[saved]: entry for saved, entry in state["state"].items() if saved in renumber},
        "param_groups": [{**group, "params": [renumber[saved] for saved in group["params"] if saved in renumber]}
                         for group in state["param_groups"]],
    }


def write_checkpoint(runset_path: Any, run_name: str, step: int, learning_rate: float | None, model: nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> str:
    """Save the training state after ``step`` as the run set's checkpoint format; returns its relative path.

    ``RUNSET/checkpoints/<run>/step-<t>.pt``, a ``torch.save`` dict of ``step``, ``learning_rate`` (of step t;
    of step 1 for t = 0), ``model`` (state_dict) and ``optimizer`` (state_dict, positions in the model's
    parameter order), written atomically (see ``runs/README.md``, "Checkpoints").
    """
    relative = f"{CHECKPOINTS_DIR}/{run_name}/step-{step}.pt"
    buffer = io.BytesIO()
    torch.save({
        "step": int(step), "learning_rate": float("nan") if learning_rate is None else float(learning_rate),
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "optimizer": {} if optimizer is None else optimizer_state_in_parameter_order(model, optimizer),
    }, buffer)
    path = Path(runset_path) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return relative


def interleave(per_rank: list[list[np.ndarray]]) -> np.ndarray:
    """One step's ids from each rank's micro-batches, in the order micro-batch m of rank 0, 1, ..., then m + 1.

    That is the order in which :class:`~simfluence.integrations.sampler.CurriculumBatchSampler` cut the
    step's batch, so a step trained from a curriculum is logged exactly as the curriculum's batch.
    """
    parts = [micro[index] for index in range(max(map(len, per_rank), default=0))
             for micro in per_rank if index < len(micro)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class _BackgroundWriter:
    """Runs logger calls in order on one daemon thread, so the training loop never waits for the disk.

    ``RunLogger`` commits every step atomically (a file rename, ~2 ms on some file systems); here that happens
    beside training. ``submit`` only appends to a queue, without waking the thread: it drains the queue every
    ``POLL_SECONDS`` (and at ``close``), so a step costs the training thread no thread switch. An error of a
    call is raised by the next ``submit`` or by ``close``; the calls after it are skipped.
    """

    POLL_SECONDS = 0.05

    def __init__(self, name: str) -> None:
        self._calls: collections.deque = collections.deque()
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=f"simfluence-log-{name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            closing = self._closing.wait(self.POLL_SECONDS)
            while self._calls:
                call, args, kwargs = self._calls.popleft()
                if self._error is None:
                    try:
                        call(*args, **kwargs)
                    except BaseException as error:  # handed to the training thread
                        self._error = error
            if closing:
                return

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, call: Callable, *args: Any, **kwargs: Any) -> None:
        self._raise()
        self._calls.append((call, args, kwargs))

    def close(self) -> None:
        """Wait for every submitted call, then raise the first error, if any."""
        self._closing.set()
        self._thread.join()
        self._raise()


class StepRecorder:
    """Collect the ids of every optimizer step on all ranks and log the steps on rank 0.

    On rank 0 the logger's writes run on a background thread (see ``_BackgroundWriter``); :meth:`finish`
    waits for them, :meth:`abandon` too after a failed training.

    Parameters
    ----------
    probe : ``probe(model) -> (n_test,)`` per-example losses of the test examples (e.g. a
        :class:`~simfluence.integrations.probes.ProbeSet`); called on rank 0 only, in the training thread.
    log_every : log the probe losses every this many optimizer steps (and always at steps 0 and the last).
    """

    def __init__(self, probe: ProbeFn, log_every: int = 1) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise RunLogError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.probe = probe
        self.log_every = log_every
        self.logger: RunLogger | None = None
        self._writer: _BackgroundWriter | None = None
        self._micro: list[np.ndarray] = []
        self._pending: list[tuple[int, list[np.ndarray], float | None]] = []
        self._probed_step = -1
        self._last_step = 0
        self._next_logged = 1
        self._tap: IdTap | None = None

    # ----------------------------------------------------------------------------------------- events
    def start(self, model: nn.Module, logger: RunLogger | None, id_column: str | None = None,
              log_initial: bool = True) -> None:
        """Begin a run: listen to ``model``'s id tap (when ``id_column`` is given) and log the initial losses.

        ``logger`` is the open logger on rank 0 and None on every other rank.
        """
        self.logger = logger
        self._micro, self._pending, self._probed_step, self._last_step = [], [], -1, 0
        if id_column is not None:
            self._tap = IdTap.on(model, id_column)
            self._tap.listeners.append(self.add_micro_batch)
        if logger is not None:
            if log_initial:
                logger.log_initial(self._probe(model))
            self._next_logged = logger.step + 1
            self._writer = _BackgroundWriter(logger.name)
        self._probed_step = 0

    def add_micro_batch(self, ids: Any) -> None:
        """Record the pool ids of one micro-batch of the current optimizer step (on this rank)."""
        self._micro.append(as_ids(ids))

    def end_step(self, step: int, learning_rate: float | None, model: nn.Module) -> None:
        """Close optimizer step ``step`` (1-based): queue its ids, and log (with probe losses) every log_every."""
        if not self._micro:
            raise RunLogError(
                f"optimizer step {step}: no example ids reached the model; the batches must carry their pool ids "
                "(wrap the dataset in simfluence.integrations.IndexedDataset and keep the id column through the "
                "collator, see simfluence.integrations.huggingface.CurriculumTrainer)"
            )
        self._pending.append((step, self._micro, None if learning_rate is None else float(learning_rate)))
        self._micro = []
        self._last_step = step
        if step % self.log_every == 0:
            self._flush(model, probe=True)

    def finish(self, model: nn.Module, close: bool = True) -> None:
        """End the run: log what is queued and the final probe losses, wait for the writes, close the logger."""
        self._flush(model, probe=True)
        if self.logger is not None and self._probed_step != self._last_step:
            self._writer.submit(self.logger.log_losses, self._probe(model))
            self._probed_step = self._last_step
        self._stop_listening()
        if self._writer is not None:
            if close:
                self._writer.submit(self.logger.close)
            writer, self._writer = self._writer, None
            writer.close()

    def abandon(self) -> None:
        """After a failed training: stop listening and wait for the writes already queued (errors dropped)."""
        self._stop_listening()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception:  # the training error that led here matters more
                pass

    # ---------------------------------------------------------------------------------------- helpers
    def _stop_listening(self) -> None:
        if self._tap is not None:
            self._tap.listeners.remove(self.add_micro_batch)
            self._tap = None

    def _probe(self, model: nn.Module) -> np.ndarray:
        return np.asarray(self.probe(model), dtype=np.float64).reshape(-1)

    def _flush(self, model: nn.Module, probe: bool) -> None:
        """Gather the queued steps on rank 0 and log them; the last one with probe losses if ``probe``."""
        if not self._pending:
            return
        gathered = gather_on_rank0([micro for _, micro, _ in self._pending])
        if self.logger is not None:
            for index, (step, _, learning_rate) in enumerate(self._pending):
                if step != self._next_logged:
                    raise RunLogError(
                        f"run {self.logger.name!r}: the trainer reports optimizer step {step} but the log expects "
                        f"step {self._next_logged}; a resumed or restarted training cannot be appended to a run log"
                    )
                ids = interleave([rank_steps[index] for rank_steps in gathered])
                last = index == len(self._pending) - 1
                losses = self._probe(model) if probe and last else None
                self._writer.submit(self.logger.log_step, positions=ids, losses=losses, learning_rate=learning_rate)
                self._next_logged += 1
                if losses is not None:
                    self._probed_step = step
        self._pending = []


@dataclass(eq=False)  # eq=False: a callback compares (and hashes) by identity, as frameworks expect
class RecordingOptions:
    """The options every run-logging callback takes: where to log the run, how to probe, which pool ids.

    :class:`~simfluence.integrations.huggingface.SimfluenceCallback` and
    :class:`~simfluence.integrations.lightning.SimfluenceLightningCallback` are dataclasses deriving from this
    one, so these keyword arguments (and their defaults) are written once; each callback adds its own after them.
    Creating one builds its :class:`StepRecorder` (``recorder``).

    Parameters
    ----------
    runset : run-set folder; created (``RunSet.create(..., exist_ok=True)``) on rank 0 if missing.
    run_name : name of this run in the run set.
    probe : ``probe(model) -> (n_test,)`` per-example losses of the test examples, e.g. a
        :class:`~simfluence.integrations.probes.ProbeSet` (Lightning passes the LightningModule); evaluated on
        rank 0 only.
    n_pool : size of the training pool; default the length of the training dataloader's dataset.
    pool_ids : (n_pool,) external ids of the pool examples for the manifest (default ``0..n_pool-1``).
    test_ids : (n_test,) external ids of the probe examples (default ``0..len(probe)-1``).
    log_every : probe-loss logging interval in optimizer steps.
    metadata : JSON metadata added to the run's (which records the training settings that matter).
    runset_metadata : JSON metadata of a run set created by the callback.
    overwrite : replace an existing run of that name.
    id_column : the batch column of pool positions.
    """

    runset: str | os.PathLike
    run_name: str
    probe: ProbeFn
    n_pool: int | None = None
    pool_ids: Sequence | None = None
    test_ids: Sequence | None = None
    log_every: int = 1
    metadata: dict | None = None
    runset_metadata: dict | None = None
    overwrite: bool = False
    id_column: str = ID_COLUMN

    def __post_init__(self) -> None:
        self.recorder = StepRecorder(self.probe, self.log_every)
        self._learning_rate: float | None = None

    def open_logger(self, dataset: Any, metadata: dict) -> RunLogger:
        """Create (or reuse) the run set and open this run's logger (rank 0); ``dataset`` the training set."""
        return open_run_logger(self.runset, self.run_name, self.probe, n_pool=self.n_pool, pool_ids=self.pool_ids,
                               test_ids=self.test_ids, dataset=dataset, runset_metadata=self.runset_metadata,
                               metadata=metadata, overwrite=self.overwrite, who=type(self).__name__)
