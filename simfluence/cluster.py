"""Ray, for work spread over more than one machine: connecting, and running many tasks with progress.

simfluence uses Ray for two things, each written next to what it distributes:
:func:`~simfluence.training.generate_runs` with ``backend="ray"`` trains runs as Ray tasks, and
:func:`~simfluence.sharding.fit_sharded` with ``backend="ray"`` fits blocks of test examples as Ray tasks.
This module holds what they share: importing Ray with a clear error when the extra is missing
(``pip install 'simfluence[ray]'``), connecting to a cluster (or starting a local one) for the duration of
the work, and :func:`run_tasks`, which submits one task per argument and yields the results as they finish.

Results travel back to the machine that called, so workers need no shared file system: a trained run comes
back as the bytes of its files, a fitted block as arrays.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from simfluence.errors import SimfluenceError

LOCAL = "local"  # start a new Ray instance on this machine (Ray's own name for it)


def require_ray() -> Any:
    """The ``ray`` module, or one clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise SimfluenceError("the Ray backend needs Ray: pip install 'simfluence[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of a ``with`` block; yields the ``ray`` module.

    A session that is already initialised (``ray.init`` called by the user) is used as it is and left open.
    Otherwise ``address`` names the cluster: ``None`` or ``"local"`` starts a Ray instance on this machine
    (with ``num_cpus`` CPUs, default all), ``"auto"`` joins the cluster this machine belongs to, and
    ``"ray://host:10001"`` or ``"host:6379"`` joins that one; the connection is closed afterwards.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    target = LOCAL if address in (None, LOCAL) else address  # "local": a new instance even if RAY_ADDRESS is set
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": logging.WARNING}
    if target == LOCAL:
        options["num_cpus"] = num_cpus or os.cpu_count() or 1
    try:
        ray.init(address=target, **options)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise SimfluenceError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def run_tasks(
    function: Callable[..., Any],
    arguments: Sequence[tuple],
    num_cpus: float = 1,
    max_in_flight: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """Run ``function(*arguments[i])`` as Ray tasks; yield ``(i, result)`` in the order they finish.

    Needs a Ray session (:func:`ray_session`). At most ``max_in_flight`` tasks are submitted at a time
    (default: twice the cluster's CPUs), so a long list does not fill the object store. A task's error is
    raised here, with the remaining tasks cancelled.
    """
    ray = require_ray()
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(function)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, int] = {}
    next_index = 0
    try:
        while pending or next_index < len(arguments):
            while next_index < len(arguments) and len(pending) < limit:
                pending[remote.remote(*arguments[next_index])] = next_index
                next_index += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, SimfluenceError):  # e.g. a TaskError: the same one line as locally
                        raise cause from None
                    raise SimfluenceError(f"a Ray task failed: {type(cause).__name__}: {cause}") from None
                yield index, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
