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


class SimfluenceWarning(UserWarning):
    """Base class of the warnings simfluence issues: an answer that may be unreliable, and why.

    The CLI prints each as one ``simfluence: warning: ...`` line on stderr; library users can filter or turn
    them into errors with :mod:`warnings` (``warnings.simplefilter("error", SimfluenceWarning)``).
    """


class FitWarning(SimfluenceWarning):
    """A fit fell back from what was asked (momentum dropped, ridge strength at the edge of its grid, ...).

    The same messages are kept in the fitted simulator's ``fit_warnings_`` (saved with the model).
    """


class ExtrapolationWarning(SimfluenceWarning):
    """A query asks about curricula unlike the training runs (e.g. batches far larger than any seen in training)."""


class NonlinearityWarning(SimfluenceWarning):
    """A first-order answer failed its own check: a replayed small edit disagrees with the prediction (training is
    not smooth enough in the data weights; see docs/smoothness.md)."""


def one_line(err: BaseException) -> str:
    """``Type: message`` of an exception raised by user code (a task, a callback), on one line; an exit of that
    code reads ``SystemExit(code)``."""
    if isinstance(err, SystemExit):
        return f"SystemExit({err.code!r})"
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
