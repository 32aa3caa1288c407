"""The digits workload's smooth training options (the recipe, Adam with eps inside the square root): recorded,
rebuilt and replayed exactly."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.attribution.unrolled import replay_losses
from simfluence.errors import SimfluenceError
from simfluence.optim import Adam
from simfluence.task import check_recorded_settings, task_fingerprint
from simfluence.workloads import digits_task, generate_digits, task_for_runset
from simfluence.workloads.digits import SMOOTH


def test_smooth_digits_runs_are_recorded_rebuilt_and_replayed_bit_for_bit(tmp_path):
    runset = generate_digits(tmp_path / "smooth", n_runs=1, n_steps=12, pool_size=80, test_size=10, seed=2,
                             smooth=True, workers=1, progress=False)
    meta = runset.metadata
    assert meta["optimizer"]["kind"] == SMOOTH["optimizer"] and meta["batch_size"] == SMOOTH["batch_size"]
    assert runset[0].curriculum.batch_sizes.max() == SMOOTH["batch_size"]
    task = task_for_runset(runset)
    check_recorded_settings(task, runset, runset[0])
    run = runset[0]
    replayed = replay_losses(task, run.curriculum, init_seed=2, seed=run.metadata["seed"], dtype=None)
    np.testing.assert_array_equal(replayed.astype(np.float32), run.losses)


def test_adam_with_eps_inside_the_square_root_is_recorded_rebuilt_and_replayed_bit_for_bit(tmp_path):
    runset = generate_digits(tmp_path / "root", n_runs=1, n_steps=12, batch_size=16, pool_size=80, test_size=10,
                             optimizer="adam", eps_root=1e-4, seed=2, workers=1, progress=False)
    assert runset.metadata["optimizer"] == {"kind": "adam", "eps": 0.0, "eps_root": 1e-4}
    task = task_for_runset(runset)
    optimizer = task.make_optimizer(task.make_model(0).parameters())
    assert type(optimizer) is Adam and optimizer.param_groups[0]["eps_root"] == 1e-4
    check_recorded_settings(task, runset, runset[0])
    run = runset[0]
    replayed = replay_losses(task, run.curriculum, init_seed=2, seed=run.metadata["seed"], dtype=None)
    np.testing.assert_array_equal(replayed.astype(np.float32), run.losses)
    assert task_fingerprint(task) != task_fingerprint(digits_task(pool_size=80, test_size=10, n_steps=12,
                                                                  optimizer="adam"))


def test_smooth_refuses_settings_it_would_override(tmp_path):
    with pytest.raises(SimfluenceError, match="batch_size"):
        generate_digits(tmp_path / "a", n_runs=1, n_steps=3, batch_size=16, smooth=True, workers=1, progress=False)
    with pytest.raises(SimfluenceError, match="eps_root"):
        digits_task(optimizer="sgd", eps_root=1e-6)
