"""Saved model and optimizer states of a logged run, as written by the built-in run generator.

The layout is documented in ``runs/README.md`` ("Checkpoints"): ``RUNSET/checkpoints/<run>/step-<t>.pt``,
listed in the run's ``metadata["checkpoints"]``, each a dict with ``step``, ``learning_rate``, ``model``
(state_dict) and ``optimizer`` (state_dict). Files are read with ``torch.load(weights_only=True)``: no
code is unpickled. A checkpoint path is relative to the run-set folder and must resolve inside it: an
absolute path, ``..`` out of the folder or a link that leads outside is refused before anything is opened.
"""
from __future__ import annotations

import copy
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import nn

from simfluence.errors import SimfluenceError
from simfluence.runlog import Run, RunSet

__all__ = ["Checkpoint", "checkpoint_steps", "load_checkpoints", "model_at"]


@dataclass
class Checkpoint:
    """One saved training state.

    Attributes
    ----------
    step : training steps done (0 = initial weights).
    learning_rate : learning rate of step ``step`` (of step 1 for step 0).
    model_state : the model's state_dict.
    optimizer_state : the optimizer's state_dict (empty if not saved).
    source : where it was read from (for messages).
    """

    step: int
    learning_rate: float
    model_state: dict
    optimizer_state: dict = field(default_factory=dict)
    source: str = ""


def model_at(template: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """A copy of ``template`` holding the checkpoint's weights (``template`` is not changed)."""
    model = copy.deepcopy(template)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as err:
        where = checkpoint.source or f"at step {checkpoint.step}"
        raise SimfluenceError(f"checkpoint {where} does not fit the model: {err}") from None
    return model


def _run_of(runset: RunSet, run: int | str | Run) -> Run:
    return run if isinstance(run, Run) else runset[run]


def _entries(runset: RunSet, run: Run) -> dict[int, str]:
    """The run's ``metadata["checkpoints"]`` as {step: relative path}, checked; raises if it saved none."""
    entries = run.metadata.get("checkpoints") or []
    if not entries:
        raise SimfluenceError(
            f"run {run.name!r} of run set {str(runset.path)!r} has no checkpoints; gradient-based methods need "
            "them (e.g. `simfluence generate digits --checkpoint-steps 0,50,100,150,200`)"
        )
    if not isinstance(entries, list):
        raise SimfluenceError(f"run {run.name!r}: metadata 'checkpoints' must be a list, got {type(entries).__name__}")
    out = {}
    for number, entry in enumerate(entries):
        step = entry.get("step") if isinstance(entry, dict) else None
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(path, str) or not path:
            raise SimfluenceError(
                f"run {run.name!r}: checkpoint entry {number} must be an object with an integer 'step' >= 0 and a "
                f"'path' string, got {str(entry)[:80]}"
            )
        out[step] = path
    return out


def checkpoint_steps(runset: RunSet, run: int | str | Run) -> list[int]:
    """Steps at which ``run`` saved a checkpoint (sorted); raises if it saved none."""
    return sorted(_entries(runset, _run_of(runset, run)))


def _inside(root: Path, relative: str, run: Run) -> Path:
    """``root / relative`` resolved, refused unless it lies inside ``root`` (no absolute path, ``..`` or link out)."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or "\0" in relative:
        raise SimfluenceError(
            f"run {run.name!r}: checkpoint path {relative!r} is absolute; paths are relative to the run-set folder"
        )
    base = root.resolve()
    try:
        resolved = (base / relative).resolve()
    except (OSError, RuntimeError) as err:  # a loop of links
        raise SimfluenceError(f"run {run.name!r}: checkpoint path {relative!r} cannot be resolved: {err}") from None
    if not resolved.is_relative_to(base):
        raise SimfluenceError(
            f"run {run.name!r}: checkpoint path {relative!r} leads outside the run-set folder {str(root)!r}"
        )
    return resolved


def load_checkpoints(runset: RunSet, run: int | str | Run, steps: Iterable[int] | None = None) -> list[Checkpoint]:
    """Load the checkpoints of one run (all, or those at ``steps``), in step order.

    Parameters
    ----------
    runset : a run set loaded from disk (its ``path`` locates the checkpoint files).
    run : run position, name or the run itself.
    steps : which saved steps to load (default all).
    """
    run = _run_of(runset, run)
    paths = _entries(runset, run)
    available = sorted(paths)
    if runset.path is None:
        raise SimfluenceError("the run set has no folder (it was built in memory), so its checkpoints cannot be read")
    wanted = available if steps is None else sorted({int(step) for step in steps})
    missing = [step for step in wanted if step not in available]
    if missing:
        raise SimfluenceError(f"run {run.name!r} has no checkpoint at step {missing[0]} (it has {available})")
    checkpoints = []
    for step in wanted:
        shown = Path(runset.path) / paths[step]
        path = _inside(Path(runset.path), paths[step], run)
        try:
            is_file = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            is_file = False
        if not is_file:
            raise SimfluenceError(f"checkpoint file {str(shown)!r} of run {run.name!r} is missing")
        try:
            saved = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises many types for a corrupt or foreign file
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SimfluenceError(f"cannot read checkpoint {str(shown)!r}: {message}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise SimfluenceError(f"checkpoint {str(shown)!r} has no 'model' state")
        saved_step, learning_rate = saved.get("step", step), saved.get("learning_rate", float("nan"))
        optimizer_state = saved.get("optimizer") or {}
        if isinstance(saved_step, bool) or not isinstance(saved_step, int) or saved_step != step:
            raise SimfluenceError(f"checkpoint {str(shown)!r} holds step {saved_step!r}, run.json lists step {step}")
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
                math.isnan(learning_rate) or (math.isfinite(learning_rate) and learning_rate >= 0)):
            raise SimfluenceError(f"checkpoint {str(shown)!r}: learning rate {learning_rate!r} is not a number >= 0")
        if not isinstance(optimizer_state, dict):
            raise SimfluenceError(f"checkpoint {str(shown)!r}: 'optimizer' must be a state dict")
        checkpoints.append(Checkpoint(
            step=saved_step,
            learning_rate=float(learning_rate),
            model_state=saved["model"],
            optimizer_state=optimizer_state,
            source=str(shown),
        ))
    return checkpoints
