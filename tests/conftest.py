"""Fixtures shared by the test modules: small run sets whose structure is known."""
from __future__ import annotations

import pytest

from simfluence.runlog import RunSet
from simfluence.synthetic import known_linear_runset


@pytest.fixture
def small_runset() -> RunSet:
    """In-memory run set from a known Simfluence-Linear model: 4 runs of 8 steps, pool of 10, 3 test examples."""
    runset, _, _ = known_linear_runset(n_pool=10, n_test=3, n_runs=4, n_steps=8, batch_size=3, seed=0)
    return runset


@pytest.fixture
def tmp_runset(tmp_path, small_runset) -> RunSet:
    """``small_runset`` saved to ``tmp_path / "runset"`` and loaded back (losses memory-mapped, ``path`` set)."""
    small_runset.save(tmp_path / "runset")
    return RunSet.load(tmp_path / "runset")


@pytest.fixture
def spawn_with_timeout():
    """``torch.multiprocessing.spawn`` that fails (and kills the workers) instead of hanging past ``timeout`` s."""

    def spawn(fn, args: tuple, nprocs: int, timeout: float) -> None:
        import time

        import torch.multiprocessing

        context = torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs, join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{fn.__name__} workers did not finish within {timeout:.0f} s")

    return spawn


@pytest.fixture
def rewrite_model():
    """``rewrite(path, edit_meta=None, edit_arrays=None)``: edit a saved model file's JSON metadata and arrays in
    place (as a hostile or corrupted file would be) and return its path."""
    from simfluence._io import atomic_savez, load_npz

    def rewrite(path, edit_meta=None, edit_arrays=None):
        arrays, meta = load_npz(path)
        if edit_meta:
            edit_meta(meta)
        if edit_arrays:
            edit_arrays(arrays)
        atomic_savez(path, arrays, meta)
        return path

    return rewrite

