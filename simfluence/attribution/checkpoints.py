"""Saved model and optimizer states of a logged run, as written by the built-in run generator.

The layout is documented in ``runs/README.md`` ("Checkpoints"): ``RUNSET/checkpoints/<run>/step-<t>.pt``,
listed in the run's ``metadata["checkpoints"]``, each a dict with ``step``, ``learning_rate``, ``model``
(state_dict) and ``optimizer`` (state_dict). Files are read with ``torch.load(weights_only=True)``: no
code is unpickled.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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


def checkpoint_steps(runset: RunSet, run: int | str | Run) -> list[int]:
    """Steps at which ``run`` saved a checkpoint (sorted); raises if it saved none."""
    run = _run_of(runset, run)
    entries = run.metadata.get("checkpoints") or []
    if not entries:
        raise SimfluenceError(
            f"run {run.name!r} of run set {str(runset.path)!r} has no checkpoints; gradient-based methods need "
            "them (e.g. `simfluence generate digits --checkpoint-steps 0,50,100,150,200`)"
        )
    return sorted(int(entry["step"]) for entry in entries)


def load_checkpoints(runset: RunSet, run: int | str | Run, steps: Iterable[int] | None = None) -> list[Checkpoint]:
    """Load the checkpoints of one run (all, or those at ``steps``), in step order.

    Parameters
    ----------
    runset : a run set loaded from disk (its ``path`` locates the checkpoint files).
    run : run position, name or the run itself.
    steps : which saved steps to load (default all).
    """
    run = _run_of(runset, run)
    available = checkpoint_steps(runset, run)
    if runset.path is None:
        raise SimfluenceError("the run set has no folder (it was built in memory), so its checkpoints cannot be read")
    wanted = available if steps is None else sorted({int(step) for step in steps})
    missing = [step for step in wanted if step not in available]
    if missing:
        raise SimfluenceError(f"run {run.name!r} has no checkpoint at step {missing[0]} (it has {available})")
    paths = {int(entry["step"]): entry["path"] for entry in run.metadata["checkpoints"]}
    checkpoints = []
    for step in wanted:
        path = Path(runset.path) / paths[step]
        if not path.is_file():
            raise SimfluenceError(f"checkpoint file {str(path)!r} of run {run.name!r} is missing")
        try:
            saved = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises many types for a corrupt or foreign file
            raise SimfluenceError(f"cannot read checkpoint {str(path)!r}: {err}") from None
        if not isinstance(saved, dict) or "model" not in saved:
            raise SimfluenceError(f"checkpoint {str(path)!r} has no 'model' state")
        checkpoints.append(Checkpoint(
            step=int(saved.get("step", step)),
            learning_rate=float(saved.get("learning_rate", float("nan"))),
            model_state=saved["model"],
            optimizer_state=saved.get("optimizer") or {},
            source=str(path),
        ))
    return checkpoints
