"""Sharded fits: blocks of test examples fitted apart and merged equal the one-piece fit."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.cli import main
from simfluence.errors import SimfluenceError
from simfluence.methods import load_simulator, make_simulator
from simfluence.runlog import RunSet
from simfluence.sharding import fit_sharded, split_tests
from simfluence.synthetic import known_linear_runset


@pytest.fixture(scope="module")
def runset() -> RunSet:
    runset, _, _ = known_linear_runset(n_pool=30, n_test=11, n_runs=10, n_steps=25, batch_size=4, noise=0.01, seed=4)
    return runset


def test_blocks_cover_every_test_once_in_order():
    blocks = split_tests(11, 4)
    assert [block.size for block in blocks] == [3, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(11))
    assert len(split_tests(3, 10)) == 3  # never an empty block


@pytest.mark.parametrize("method", ["linear", "additive", "linear_step"])
def test_a_sharded_fit_at_fixed_lam_equals_the_one_piece_fit(runset, method):
    whole = make_simulator(method).set_params(lam=1e-2).fit(runset)
    sharded = fit_sharded(make_simulator(method).set_params(lam=1e-2), runset, n_blocks=4)
    for name in whole._test_axis_arrays:
        np.testing.assert_allclose(getattr(sharded, name), getattr(whole, name), rtol=1e-6, atol=1e-9)
    curriculum, initial = runset[0].curriculum, runset[0].initial_losses
    np.testing.assert_allclose(sharded.simulate(curriculum, initial), whole.simulate(curriculum, initial),
                               rtol=1e-8, atol=1e-10)
    assert sharded.test_ids_ == whole.test_ids_ and sharded.pool_ids_ == whole.pool_ids_


def test_automatic_choices_are_made_once_for_all_tests_as_in_the_one_piece_fit(runset):
    whole = make_simulator("linear_mom").fit(runset)
    sharded = fit_sharded(make_simulator("linear_mom"), runset, n_blocks=3)
    assert (sharded.lam_, sharded.momentum_) == (whole.lam_, whole.momentum_)
    assert len(sharded.validation_) == len(whole.validation_) > 1
    for mine, theirs in zip(sharded.validation_, whole.validation_, strict=True):
        assert (mine["lam"], mine["momentum"]) == (theirs["lam"], theirs["momentum"])
        assert mine["mse"] == pytest.approx(theirs["mse"], rel=1e-5)
    np.testing.assert_allclose(sharded.B_, whole.B_, rtol=1e-5, atol=1e-8)


def test_blocks_that_chose_another_lam_on_their_own_are_refitted_with_the_joint_choice(runset):
    # every block sees different tests, so left alone some would pick other strengths; one model has one lam
    sharded = fit_sharded(make_simulator("linear").set_params(lam="auto"), runset, n_blocks=11)
    alone = [make_simulator("linear").set_params(lam="auto").fit(runset.select_tests([z])).lam_ for z in range(11)]
    assert len(set(alone)) > 1, "the check needs tests that would choose differently"
    whole = make_simulator("linear").set_params(lam=sharded.lam_).fit(runset)
    np.testing.assert_allclose(sharded.A_, whole.A_, rtol=1e-5, atol=1e-8)


def test_a_sharded_model_saves_and_loads_like_any_other(runset, tmp_path):
    sharded = fit_sharded(make_simulator("linear_mom"), runset, n_blocks=2)
    loaded = load_simulator(sharded.save(tmp_path / "model.npz"))
    curriculum, initial = runset[1].curriculum, runset[1].initial_losses
    np.testing.assert_array_equal(loaded.simulate(curriculum, initial), sharded.simulate(curriculum, initial))


def test_methods_that_cannot_be_sharded_are_one_error(runset):
    with pytest.raises(SimfluenceError, match="cannot be fitted in test blocks"):
        fit_sharded(make_simulator("mean_curve"), runset, n_blocks=2)
    with pytest.raises(SimfluenceError, match="backend must be one of"):
        fit_sharded(make_simulator("linear"), runset, backend="spark")


def test_fit_with_blocks_on_the_cli(runset, tmp_path):
    runset.save(tmp_path / "runs")
    assert main(["fit", str(tmp_path / "runs"), "--method", "linear", "--lam", "0.01", "--blocks", "3",
                 "--out", str(tmp_path / "sharded.npz")]) == 0
    assert main(["fit", str(tmp_path / "runs"), "--method", "linear", "--lam", "0.01",
                 "--out", str(tmp_path / "whole.npz")]) == 0
    sharded, whole = load_simulator(tmp_path / "sharded.npz"), load_simulator(tmp_path / "whole.npz")
    np.testing.assert_allclose(sharded.A_, whole.A_, rtol=1e-6, atol=1e-9)


def test_blocks_that_extended_the_lam_grid_differently_are_combined_by_candidate():
    """Validation tables are matched by (lam, momentum), over the candidates every block tried, not by position."""
    from types import SimpleNamespace

    from simfluence.sharding import _joint_choice

    def block(errors: dict[float, float | None]) -> SimpleNamespace:
        return SimpleNamespace(validation_=[{"lam": lam, "momentum": 0.0, "mse": mse} for lam, mse in errors.items()])

    first = block({100.0: 0.5, 10.0: 0.2, 1.0: 0.1})  # extended towards weak lam
    second = block({1000.0: 0.3, 100.0: 0.4, 10.0: 0.1})  # extended towards strong lam
    assert _joint_choice([first, second], [1, 3]) == (10.0, 0.0)
    assert first.validation_ == second.validation_ == [{"lam": 100.0, "momentum": 0.0, "mse": (0.5 + 3 * 0.4) / 4},
                                                        {"lam": 10.0, "momentum": 0.0, "mse": (0.2 + 3 * 0.1) / 4}]
    with_gap = [block({100.0: 0.01, 10.0: 0.2}), block({100.0: None, 10.0: 0.3})]
    assert _joint_choice(with_gap, [1, 1]) == (10.0, 0.0) and with_gap[0].validation_[0]["mse"] is None
