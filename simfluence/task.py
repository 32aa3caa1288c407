"""The Task: the one description of a model that everything which trains or differentiates takes.

A :class:`Task` holds what a logged run set does not: how to build the model (with fixed initial weights,
``make_model(init_seed)``), the pool and test data, the per-example loss, the optimizer, the learning-rate
schedule and the external ids of the pool and test examples. Run generation, counterfactual verification
(retraining for real) and the gradient-based methods all reach the model through a Task.

The built-in workloads (:mod:`simfluence.workloads`) are Tasks and are rebuilt from a run set's manifest.
Your own task is a function returning a Task, in a file of yours; :func:`load_task` loads it from
``path/to/file.py:function`` (the CLI's ``--task``), :meth:`Task.aligned_to` matches its rows to a run set's
ids (an imported run set may list only the examples it used, in another order), and
:func:`simfluence.workloads.task_for_runset` picks the task of a run set: the one given, or the built-in one it
records (this module imports nothing above it; the trainer is :mod:`simfluence.training`).

Whether a task is the one that trained a run set is checked, not assumed: :func:`task_fingerprint` hashes what
determines training (initial weights, model, data, loss, optimizer, schedule) so that resumed work refuses
another task; :func:`check_recorded_settings` compares what a run records (optimizer, weight decay, clipping,
init seed) with the task before any retraining; :func:`check_replay` compares a retrained run with its log
(within :data:`REPLAY_TOLERANCE`, chosen from measurement) and :func:`check_checkpoint_losses` a run's saved
checkpoints with the losses it logged.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import itertools
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from simfluence.errors import SimfluenceWarning, TaskError, UnknownIdError, one_line
from simfluence.ids import IdIndex

if TYPE_CHECKING:
    from simfluence.runlog import Run, RunSet

__all__ = ["REPLAY_TOLERANCE", "ReplayWarning", "Task", "check_checkpoint_losses", "check_recorded_settings",
           "check_replay", "check_schedule", "fingerprint_change", "fingerprint_digest", "initial_model", "load_task",
           "probe_losses", "recorded_init_seed", "task_fingerprint", "task_fingerprint_parts", "torch_device"]

TASK_HINT = "pass --task path/to/file.py:function (Python: task=...)"


@dataclass(eq=False)
class Task:
    """Everything task-specific needed to train and evaluate one model on any curriculum.

    For ``workers > 1`` the task is pickled to the worker processes, so its callables must be picklable:
    module-level functions, ``functools.partial`` of them, or instances of module-level classes (no lambdas).
    Functions of a task file loaded with :func:`load_task` qualify.

    Attributes
    ----------
    make_model : ``make_model(seed) -> nn.Module``; called under ``torch.manual_seed(seed)``.
    pool_inputs : (n_pool, ...) inputs of the training pool; a curriculum id i is row i.
    pool_targets : (n_pool, ...) their targets.
    test_inputs : (n_test, ...) inputs of the test (probe) examples.
    test_targets : (n_test, ...) their targets.
    loss_fn : ``loss_fn(outputs, targets) -> (batch,)`` per-example loss (``reduction='none'``); the training
        loss of a step is its mean over the batch.
    make_optimizer : ``make_optimizer(params) -> torch.optim.Optimizer``; the learning rate it sets is
        overwritten every step with ``lr_at(step)``.
    lr_at : ``lr_at(step) -> float`` learning rate of step ``step`` (1-based).
    metadata : JSON description of the task (stored in the run-set manifest).
    pool_ids, test_ids : external ids of pool and test examples (default ``range``).
    init_seed : seed of the initial weights every run starts from (``make_model(init_seed)``).
    """

    make_model: Callable[[int], nn.Module]
    pool_inputs: torch.Tensor
    pool_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    lr_at: Callable[[int], float]
    metadata: dict = field(default_factory=dict)
    pool_ids: Sequence | None = None
    test_ids: Sequence | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.pool_inputs) != len(self.pool_targets):
            raise TaskError(f"task: {len(self.pool_inputs)} pool inputs but {len(self.pool_targets)} targets")
        if len(self.test_inputs) != len(self.test_targets):
            raise TaskError(f"task: {len(self.test_inputs)} test inputs but {len(self.test_targets)} targets")
        for what, ids, count in (("pool", self.pool_ids, self.n_pool), ("test", self.test_ids, self.n_test)):
            if ids is not None and len(ids) != count:
                raise TaskError(f"task: {len(ids)} {what} ids for {count} {what} examples")

    @property
    def n_pool(self) -> int:
        return len(self.pool_inputs)

    @property
    def n_test(self) -> int:
        return len(self.test_inputs)

    def external_pool_ids(self) -> list:
        """The pool ids in row order (``pool_ids``, or ``0..n_pool-1``)."""
        return list(range(self.n_pool)) if self.pool_ids is None else list(self.pool_ids)

    def external_test_ids(self) -> list:
        """The test ids in row order (``test_ids``, or ``0..n_test-1``)."""
        return list(range(self.n_test)) if self.test_ids is None else list(self.test_ids)

    def aligned_to(self, runset: RunSet) -> Task:
        """This task with its pool and test rows in the order (and subset) of a run set's ids.

        Row i of the aligned pool is the example with id ``runset.pool_ids[i]``, so the run set's curricula
        (internal positions) index it directly; likewise for the test rows and the loss columns. Ids match
        by value, or by their text when the types differ (an id 7 of the task matches ``"7"`` read from a
        CSV). ``metadata`` is kept as it is (per-example lists in it are not reordered).

        Parameters
        ----------
        runset : the run set whose ``pool_ids`` (n_pool,) and ``test_ids`` (n_test,) the rows must follow.

        Returns
        -------
        Task with ``runset.n_pool`` pool rows and ``runset.n_test`` test rows and the run set's ids; ``self``
        when the rows already are in that order.

        Raises
        ------
        TaskError : an id of the run set is not among the task's ids (the message names it).
        """
        pool = self._rows_of(runset.pool_ids, self.external_pool_ids(), "pool", runset)
        test = self._rows_of(runset.test_ids, self.external_test_ids(), "test", runset)
        if _is_identity(pool, self.n_pool) and _is_identity(test, self.n_test):
            return self
        pool_index, test_index = torch.as_tensor(pool), torch.as_tensor(test)
        return dataclasses.replace(
            self,
            pool_inputs=self.pool_inputs[pool_index], pool_targets=self.pool_targets[pool_index],
            test_inputs=self.test_inputs[test_index], test_targets=self.test_targets[test_index],
            pool_ids=list(runset.pool_ids), test_ids=list(runset.test_ids),
        )

    @staticmethod
    def _rows_of(wanted: Sequence, ids: list, what: str, runset: RunSet) -> np.ndarray:
        index = IdIndex(ids, what)
        try:
            return index.positions(wanted)
        except UnknownIdError:
            missing = next(value for value in wanted if value not in index)
            where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
            raise TaskError(f"{where} has {what} id {missing!r}, which the task does not have "
                            f"(the task has {len(ids)} {what} ids)") from None


def _is_identity(positions: np.ndarray, count: int) -> bool:
    return len(positions) == count and bool(np.array_equal(positions, np.arange(count)))


# ------------------------------------------------------------------------------------------- loading
_MODULE_NUMBERS = itertools.count()
# module name -> task file, of every file loaded by load_task; worker processes load them again under the
# same names so that the task's functions unpickle there
_TASK_FILES: dict[str, str] = {}


def _import_file(path: Path, name: str) -> Any:
    """Execute ``path`` as the module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {str(path)!r} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def loaded_task_files() -> dict[str, str]:
    """Module name -> path of the task files :func:`load_task` loaded in this process (for worker processes)."""
    return dict(_TASK_FILES)


def import_task_files(files: dict[str, str]) -> None:
    """Load task files under the module names they had in the parent process (worker start-up)."""
    for name, path in files.items():
        if name not in sys.modules:
            _import_file(Path(path), name)


def load_task(spec: str) -> Task:
    """Load a task from ``path/to/file.py:function`` or ``package.module:function``.

    The file is executed as a fresh module (a unique name, so a file called ``task.py`` shadows nothing)
    and the function is called with no arguments. The file's folder is appended to ``sys.path`` (if it is
    not there yet), so the file can import modules that lie beside it, as it could when run as a script.

    Parameters
    ----------
    spec : ``FILE.py:FUNCTION`` (a path, relative to the working directory) or ``MODULE:FUNCTION``.

    Returns
    -------
    The Task the function returns.

    Raises
    ------
    TaskError : one line naming ``spec``: no colon, missing file, an error while loading the file or the
        module, no such function, the function raising, or returning something that is not a Task.
    """
    target, colon, function_name = str(spec).rpartition(":")
    if not colon or not target or not function_name.isidentifier():
        raise TaskError(f"task {spec!r} is not of the form path/to/file.py:function or package.module:function")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise TaskError(f"task {spec!r}: no file {target!r}")
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        name = f"_simfluence_task_{digest}_{next(_MODULE_NUMBERS)}"
        try:
            module = _import_file(path, name)
        except Exception as err:
            raise TaskError(f"task {spec!r}: loading {target!r} failed: {one_line(err)}") from None
        _TASK_FILES[name] = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise TaskError(f"task {spec!r}: importing module {target!r} failed: {one_line(err)}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError(f"task {spec!r}: {target!r} has no function {function_name!r}")
    try:
        task = function()
    except Exception as err:
        raise TaskError(f"task {spec!r}: {function_name}() raised {one_line(err)}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {spec!r}: {function_name}() returned a {type(task).__name__}, not a "
                        "simfluence.task.Task")
    return task


def recorded_init_seed(runset: RunSet, task: Task) -> int:
    """Seed of the initial weights a run set's runs share: the one its generator recorded, else ``task.init_seed``."""
    recorded = (runset.metadata.get("generator") or {}).get("init_seed")
    return int(task.init_seed if recorded is None else recorded)


def check_schedule(task: Task, run: Run) -> None:
    """The task's learning rates must be the ones ``run`` logged (where it logged them), else a replay differs.

    Raises
    ------
    TaskError : naming the first step whose rates differ.
    """
    logged = np.asarray(run.learning_rates, dtype=np.float64)
    steps = np.flatnonzero(np.isfinite(logged)) + 1
    if steps.size == 0:
        return
    rates = np.array([float(task.lr_at(int(step))) for step in steps])
    wrong = np.flatnonzero(~np.isclose(rates, logged[steps - 1], rtol=1e-6, atol=0.0))
    if wrong.size:
        step = int(steps[wrong[0]])
        raise TaskError(f"the task's learning rate at step {step} is {rates[wrong[0]]:g} but run {run.name!r} "
                        f"logged {logged[step - 1]:g}: the task does not describe this run")


# --------------------------------------------------------------------------------------------- fingerprint
FINGERPRINT_SCHEDULE_STEPS = 1024  # learning rates of steps 1..this enter the fingerprint (cheap to evaluate)
FINGERPRINT_PARTS = ("initial weights", "model", "pool data", "test data", "loss function", "optimizer",
                     "learning-rate schedule")


def torch_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device` (None: the CPU), refused in one line when torch cannot name it or this
    machine does not have it (``"cuda"`` without a GPU, say)."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TaskError(f"device {device!r} is not a torch device ({one_line(err)})") from None
    available = {"cpu": True, "meta": False, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if not available.get(resolved.type, True):
        raise TaskError(f"device {str(resolved)!r} is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise TaskError(f"device {str(resolved)!r} is not available: this machine has {torch.cuda.device_count()} "
                        "CUDA device(s)")
    return resolved


def initial_model(task: Task, init_seed: int | None = None) -> nn.Module:
    """The model every run of ``task`` starts from: ``make_model(init_seed)`` under ``torch.manual_seed(init_seed)``.

    The global torch random state is left as it was. ``init_seed`` defaults to ``task.init_seed``.
    """
    seed = int(task.init_seed if init_seed is None else init_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.make_model(seed)


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(value: Any) -> bytes:
    """Dtype, shape and raw bytes of a tensor (or array-like), independent of its device and memory layout."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    value = value.detach().cpu().contiguous()
    raw = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return f"{value.dtype}{tuple(value.shape)}".encode() + raw


# library classes that moved, by their name before the move: fingerprints recorded before it stay valid
_FORMER_NAMES = {"simfluence.training.WarmupCosine": "simfluence.workloads.generator.WarmupCosine"}


def _identity(obj: Any) -> str:
    """Qualified name of a callable (plus its code, bound arguments or fields): what it is, not where it lives.

    A function of a task file loaded by :func:`load_task` lives in a module whose name changes from load to
    load, so it is named by its qualified name alone; its bytecode and constants say what it does.
    """
    if isinstance(obj, functools.partial):
        return f"partial({_identity(obj.func)}, args={obj.args!r}, keywords={sorted(obj.keywords.items())!r})"
    if isinstance(obj, (type(None), bool, int, float, str, tuple, list, dict)):
        return repr(obj)
    kind = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    module = getattr(kind, "__module__", "") or ""
    name = f"{'task-file' if module.startswith('_simfluence_task_') else module}.{getattr(kind, '__qualname__', '?')}"
    name = _FORMER_NAMES.get(name, name)
    code = getattr(obj, "__code__", None)
    if code is not None:
        consts = tuple(c for c in code.co_consts if not hasattr(c, "co_code"))
        name += f"[code {_sha256(code.co_code, repr((consts, code.co_names)).encode())[:16]}]"
    if kind is not obj:  # an instance: its class and its fields
        fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else getattr(obj, "__dict__", {})
        name += f"({sorted((key, repr(value)) for key, value in fields.items())!r})"
    return name


def _schedule_values(lr_at: Callable[[int], float]) -> str:
    """The learning rates of steps 1..FINGERPRINT_SCHEDULE_STEPS (as far as the schedule answers)."""
    rates = []
    for step in range(1, FINGERPRINT_SCHEDULE_STEPS + 1):
        try:
            rates.append(float(lr_at(step)))
        except (Exception, SystemExit) as err:  # a schedule defined for fewer steps: where it stops is part of it
            rates.append(f"{type(err).__name__} at step {step}")
            break
    return repr(rates)


def task_fingerprint_parts(task: Task, init_seed: int | None = None) -> dict[str, str]:
    """sha256 digests of each part of a task that determines its training runs (:data:`FINGERPRINT_PARTS`).

    ``initial weights``: the state of :func:`initial_model`; ``model``: its class and module structure;
    ``pool data`` / ``test data``: the input and target tensors (dtype, shape, values; so ``n_pool`` /
    ``n_test`` and the row order); ``loss function``: identity of ``loss_fn``; ``optimizer``: identity of
    ``make_optimizer``, the optimizer class and the hyper-parameters of its groups on the initial model;
    ``learning-rate schedule``: identity of ``lr_at`` and its rates over the first
    :data:`FINGERPRINT_SCHEDULE_STEPS` steps.

    Raises
    ------
    TaskError : ``make_model`` or ``make_optimizer`` raises (naming the function and its exception).
    """
    try:
        model = initial_model(task, init_seed)
    except (Exception, SystemExit) as err:
        raise TaskError(f"the task's make_model raised {one_line(err)}") from None
    state = model.state_dict()
    weights = [name.encode() + _tensor_bytes(value) for name, value in state.items()]
    try:
        optimizer = task.make_optimizer(model.parameters())
    except (Exception, SystemExit) as err:
        raise TaskError(f"the task's make_optimizer raised {one_line(err)}") from None
    groups = [sorted((key, repr(value)) for key, value in group.items() if key not in ("params", "lr"))
              for group in optimizer.param_groups]
    optimizer_kind = type(optimizer)
    parts = {
        "initial weights": _sha256(*weights),
        "model": _sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode(), repr(model).encode()),
        "pool data": _sha256(_tensor_bytes(task.pool_inputs), _tensor_bytes(task.pool_targets)),
        "test data": _sha256(_tensor_bytes(task.test_inputs), _tensor_bytes(task.test_targets)),
        "loss function": _sha256(_identity(task.loss_fn).encode()),
        "optimizer": _sha256(_identity(task.make_optimizer).encode(),
                             f"{optimizer_kind.__module__}.{optimizer_kind.__qualname__}".encode(),
                             repr(groups).encode()),
        "learning-rate schedule": _sha256(_identity(task.lr_at).encode(), _schedule_values(task.lr_at).encode()),
    }
    return parts


def task_fingerprint(task: Task, init_seed: int | None = None) -> str:
    """A stable sha256 (hex) of everything in ``task`` that determines its training runs.

    Two tasks with the same fingerprint train the same runs from the same curricula: same initial weights
    (``make_model(init_seed)``, default ``task.init_seed``), model structure, pool and test data (values and
    row order), loss function, optimizer (class and hyper-parameters) and learning-rate schedule. It is the
    digest of :func:`task_fingerprint_parts`, which says which part differs (:func:`fingerprint_change`).
    Ids and ``metadata`` do not enter it.
    """
    return fingerprint_digest(task_fingerprint_parts(task, init_seed))


def fingerprint_digest(parts: dict[str, str]) -> str:
    """The :func:`task_fingerprint` of given :func:`task_fingerprint_parts`."""
    return _sha256(*(f"{name}={parts.get(name)}".encode() for name in FINGERPRINT_PARTS))


def fingerprint_change(recorded: dict[str, str], current: dict[str, str]) -> str:
    """Which parts of a task differ between two :func:`task_fingerprint_parts` (e.g. ``"initial weights, optimizer"``);
    ``""`` when none does."""
    return ", ".join(name for name in FINGERPRINT_PARTS if recorded.get(name) != current.get(name))


# --------------------------------------------------------------------------------------------- replay checks
# Largest |replayed - logged| test loss accepted, as a fraction of the run's mean |logged| loss. Measured on this
# CPU (replaying one 200-step run of digits, MLP with SGD+momentum or Adam, and one 60-step run of facts mini, a
# tiny transformer with AdamW): a correct task replays a generated run exactly (difference 0); with float32 noise
# (initial weights perturbed by 1e-7..1e-6 relative, or four threads without deterministic algorithms) the
# difference stays below 3.4e-6 (digits) and 1.1e-5 (facts), i.e. <= 4.6e-6 of the mean loss (0.73-2.75); the
# wrong tasks of issue 21 differ by 1.0-3.1 (wrong init seed), 4.9 (no momentum) and 4.5-21 (shuffled test
# rows) times the mean loss (facts' make_model loads a pretrained base, so its init seed changes nothing). 1e-2
# leaves room for runs logged on other hardware (GPU kernels, thread counts, float64 replays) and is still
# 100x below the smallest wrong-task difference seen.
REPLAY_TOLERANCE = 1e-2


class ReplayWarning(SimfluenceWarning):
    """Retraining a logged run reproduces it only beyond :data:`REPLAY_TOLERANCE` (a raised tolerance let it pass)."""


def _run_where(runset: RunSet, run: Run) -> str:
    where = f" of {str(runset.path)!r}" if runset.path is not None else ""
    return f"run {run.name!r}{where}"


def _trainer_settings(task: Task) -> dict[str, Any]:
    """Gradient clipping and accumulation of the task's own training loop (a framework's, or generate_runs')."""
    make_arguments = getattr(task, "training_arguments", None)  # a TrainerTask: transformers.TrainingArguments
    if make_arguments is None:  # the plain loop of generate_runs: one unclipped step per batch
        return {"max_grad_norm": 0.0, "gradient_clip_val": 0.0}
    with tempfile.TemporaryDirectory(prefix="simfluence-args-") as folder:
        arguments = make_arguments(folder, 1, 0)
    return {"max_grad_norm": float(arguments.max_grad_norm or 0.0),
            "gradient_accumulation_steps": int(arguments.gradient_accumulation_steps),
            "per_device_train_batch_size": int(arguments.per_device_train_batch_size)}


def _same(recorded: Any, current: Any) -> bool:
    """Recorded and current setting agree: names case- and underscore-blind, numbers to 1e-9, None as 0."""
    if isinstance(recorded, str) and isinstance(current, str):
        return recorded.replace("_", "").lower() == current.replace("_", "").lower()
    try:
        return bool(np.isclose(float(recorded or 0.0), float(current or 0.0), rtol=1e-9, atol=0.0))
    except (TypeError, ValueError):
        return recorded == current


def check_recorded_settings(task: Task, runset: RunSet, run: Run, init_seed: int | None = None) -> None:
    """What the run (or its run set) records about its training must agree with the task, before any retraining.

    Compared where recorded: the optimizer (class name, e.g. ``"sgd"`` / ``"AdamW"``; run metadata
    ``"optimizer"`` or the run set's ``metadata["optimizer"]["kind"]``), its ``momentum``, ``weight_decay``, ``eps``
    and ``eps_root`` (inside the square root, :class:`simfluence.optim.AdamW`) (largest over parameter groups;
    a group without one counts 0), gradient clipping (``max_grad_norm``, Lightning's ``gradient_clip_val``),
    ``gradient_accumulation_steps`` / ``per_device_train_batch_size`` (Trainer runs), and the run's
    ``init_seed`` against the one the retraining uses.

    Raises
    ------
    TaskError : one line naming the run, the setting, the recorded value and the task's.
    """
    used_seed = recorded_init_seed(runset, task) if init_seed is None else int(init_seed)
    recorded: dict[str, Any] = {}
    for source in (runset.metadata, run.metadata):
        optimizer = source.get("optimizer")
        if isinstance(optimizer, dict):
            recorded.update({key: value for key, value in optimizer.items()
                             if key in ("momentum", "weight_decay", "eps", "eps_root")})
            optimizer = optimizer.get("kind")
        if isinstance(optimizer, str):
            recorded["optimizer"] = optimizer
        recorded.update({key: source[key] for key in ("momentum", "weight_decay", "max_grad_norm", "gradient_clip_val",
                                                     "gradient_accumulation_steps", "per_device_train_batch_size")
                         if source.get(key) is not None})
    if not recorded and "init_seed" not in run.metadata:
        return
    try:
        model = initial_model(task, used_seed)
        optimizer = task.make_optimizer(model.parameters())
        trainer = _trainer_settings(task)
    except Exception as err:
        raise TaskError(f"building the task's model and optimizer raised {one_line(err)}") from None
    groups = optimizer.param_groups
    current: dict[str, Any] = {
        "optimizer": type(optimizer).__name__,
        "momentum": max(float(group.get("momentum", 0.0) or 0.0) for group in groups),
        "weight_decay": max(float(group.get("weight_decay", 0.0) or 0.0) for group in groups),
        "eps": max(float(group.get("eps", 0.0) or 0.0) for group in groups),
        "eps_root": max(float(group.get("eps_root", 0.0) or 0.0) for group in groups),  # simfluence.optim.AdamW
        **trainer,
    }
    if "init_seed" in run.metadata:
        recorded["init_seed"], current["init_seed"] = run.metadata["init_seed"], used_seed
    for key, value in recorded.items():
        if key in current and not _same(value, current[key]):
            raise TaskError(f"{_run_where(runset, run)} records {key} = {value!r} but the task has "
                            f"{current[key]!r}: the task does not describe this run")


def check_replay(runset: RunSet, run: Run, replayed: np.ndarray, tolerance: float | None = None,
                 steps: Sequence[int] | None = None, what: str = "retraining") -> float:
    """Compare the test losses of a retrained (replayed) run with the ones ``run`` logged.

    Parameters
    ----------
    runset, run : the logged run (for its name and folder in the message).
    replayed : (T + 1, n_test) test losses of the retrained run at steps 0..T, or (len(steps), n_test) at
        ``steps``; compared where the run logged its losses. A NaN or infinite loss where the log has a finite one
        is an infinite difference.
    tolerance : largest accepted ``max |replayed - logged|`` as a fraction of the run's mean |logged| loss
        (default :data:`REPLAY_TOLERANCE`). A tolerance above the default that lets a larger difference pass
        emits a :class:`ReplayWarning`.
    steps : the steps of the rows of ``replayed`` (default 0..T).
    what : what produced ``replayed``, for the messages (``"retraining"``, ``"the checkpoints of"``, ...).

    Returns
    -------
    difference : largest |replayed - logged| over the logged steps and test examples.

    Raises
    ------
    TaskError : the difference exceeds the tolerance (the task is not the one that trained the run).
    """
    logged, _ = run.dense_losses()
    scale = float(np.abs(logged[np.isfinite(logged)]).mean()) if np.isfinite(logged).any() else 1.0
    scale = scale if scale > 0 else 1.0
    if steps is not None:
        logged = logged[np.asarray(steps, dtype=np.int64)]
    replayed = np.asarray(replayed, dtype=np.float64)
    if replayed.shape != logged.shape:
        raise TaskError(f"retraining {_run_where(runset, run)} gave test losses of shape {replayed.shape}, "
                        f"its log has {logged.shape}")
    both = np.isfinite(logged) & np.isfinite(replayed)
    gap = np.abs(replayed - logged)[both]
    difference = float(gap.max()) if gap.size else 0.0
    if np.any(np.isfinite(logged) & ~np.isfinite(replayed)):
        difference = float("inf")
    tolerance = REPLAY_TOLERANCE if tolerance is None else float(tolerance)
    trained_on = run.metadata.get("device")  # recorded by the generator for runs trained off the CPU
    if not difference <= tolerance * scale:
        raise TaskError(
            f"{what} {_run_where(runset, run)} with the task does not reproduce its log: test losses differ by "
            f"up to {difference:.3g} (mean loss {scale:.3g}, tolerance {tolerance:g} of it); " + (
                f"the run was trained on {trained_on!r}, whose rounding a CPU replay does not reproduce (replay it on "
                "that device, or raise the tolerance)" if trained_on not in (None, "cpu") else
                "the task differs from the one that trained the run (initial weights or seed, optimizer, data rows, "
                "loss?)") + "; to go on anyway raise the tolerance (--replay-tolerance / replay_tolerance=)")
    if difference > REPLAY_TOLERANCE * scale:
        warnings.warn(f"NOT REPRODUCED: {what} {_run_where(runset, run)} reproduces its log only to "
                      f"{difference:.3g} ({difference / scale:.2g} of its mean loss, beyond the default tolerance "
                      f"{REPLAY_TOLERANCE:g}): results measured against this retraining may not describe the logged "
                      "runs",
                      ReplayWarning, stacklevel=2)
    return difference


def probe_losses(task: Task, model: nn.Module) -> np.ndarray:
    """(n_test,) float64 ``loss_fn(model(test_inputs), test_targets)`` in eval mode, as the generator logs them."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = task.loss_fn(model(task.test_inputs), task.test_targets)
    finally:
        model.train(was_training)
    return losses.detach().to(torch.float64).cpu().numpy().reshape(-1)


def check_checkpoint_losses(task: Task, runset: RunSet, run: Run, checkpoints: Sequence[Any],
                            tolerance: float | None = None) -> float:
    """The task's test losses at a run's saved checkpoints must be the ones the run logged at those steps.

    What gradient methods can check cheaply: they take the weights from the checkpoints, so a wrong model, loss
    or test rows (not a wrong init seed or optimizer) would make them score another model than the logged one.

    Parameters
    ----------
    checkpoints : objects with ``step`` and ``model_state`` (a state_dict), e.g.
        :class:`~simfluence.attribution.checkpoints.Checkpoint`; those at steps the run did not log are skipped.
    tolerance : as for :func:`check_replay`.

    Returns
    -------
    difference : largest |task's - logged| test loss over the checkpoints compared (0 when none is).

    Raises
    ------
    TaskError : the difference exceeds the tolerance, or a checkpoint does not fit the task's model.
    """
    _, logged_mask = run.dense_losses()
    chosen = [checkpoint for checkpoint in checkpoints
              if 0 <= int(checkpoint.step) < len(logged_mask) and logged_mask[int(checkpoint.step)]]
    if not chosen:
        return 0.0
    model = initial_model(task)
    losses = []
    for checkpoint in chosen:
        try:
            model.load_state_dict(checkpoint.model_state)
        except RuntimeError as err:
            raise TaskError(f"the checkpoint of {_run_where(runset, run)} at step {checkpoint.step} does not fit "
                            f"the task's model: {' '.join(str(err).split())[:200]}") from None
        losses.append(probe_losses(task, model))
    return check_replay(runset, run, np.stack(losses), tolerance, steps=[int(c.step) for c in chosen],
                        what="evaluating the checkpoints of")
