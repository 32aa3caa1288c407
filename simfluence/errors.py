"""Exception types of simfluence.

Every error a user can cause (a malformed log, an unknown id, a bad option) is raised as one of these,
with a message that names the file, run, step or id at fault. The CLI prints the message as a single
stderr line and exits non-zero; library users can catch ``SimfluenceError``.
"""
from __future__ import annotations


class SimfluenceError(Exception):
    """Base class of every error simfluence raises on purpose."""


class RunLogError(SimfluenceError):
    """A run set or run log on disk (or being written) is malformed or inconsistent."""


class CurriculumError(SimfluenceError):
    """A curriculum or a curriculum edit is invalid (ids out of range, bad step, ...)."""


class ImportTableError(SimfluenceError):
    """A curriculum or loss table given to the importer is malformed."""


class NotFittedError(SimfluenceError):
    """A simulator was used before ``fit`` (or ``load``)."""


class ModelFileError(SimfluenceError):
    """A saved simulator file is missing, malformed or of an unknown kind/version."""


class UnknownIdError(SimfluenceError):
    """An id that is not among the pool or test ids it was looked up in."""


class TaskError(SimfluenceError):
    """A task (model, data, loss, optimizer) cannot be loaded, does not fit a run set, or is missing."""
