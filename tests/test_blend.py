"""Convex blends of simulators: weights chosen on validation runs, prediction, leave-one-out, model files."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.blend import BlendSimulator, blend_errors, simplex_grid
from simfluence.errors import ModelFileError, SimfluenceError
from simfluence.methods import METHODS, load_simulator
from simfluence.simulators import Simulator
from simfluence.synthetic import known_linear_runset


@pytest.fixture(scope="module")
def linear_runs():
    """10 runs that follow a known Simfluence-Linear model exactly."""
    runset, _, _ = known_linear_runset(n_pool=20, n_test=4, n_runs=10, n_steps=20, batch_size=3, seed=1)
    return runset


@pytest.fixture(scope="module")
def fixed_blend(linear_runs):
    return BlendSimulator(members=("linear", "additive"), weight=[0.3, 0.7]).fit(linear_runs)


def test_the_simplex_grid_holds_every_convex_weight_vector_of_its_step():
    grid = simplex_grid(3, 5)
    assert grid.shape == (15, 3)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(row) for row in grid}) == 15 and (grid >= 0).all()
    np.testing.assert_allclose(simplex_grid(2, 21)[:, 0], np.linspace(0, 1, 21))
    np.testing.assert_array_equal(simplex_grid(1, 21), [[1.0]])


@pytest.mark.parametrize("truth", [[0.35, 0.65], [0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])
def test_the_validation_error_is_lowest_at_the_true_blend(truth):
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(len(truth), 3, 9, 5))
    actual = np.einsum("m,m...->...", np.asarray(truth), predictions)
    mask = np.ones((3, 9), dtype=bool)
    grid = simplex_grid(len(truth), 21)
    errors = blend_errors(list(predictions - actual), mask, grid)
    np.testing.assert_allclose(grid[np.argmin(errors)], truth, atol=1e-12)
    direct = [((np.einsum("m,m...->...", w, predictions) - actual) ** 2).mean() for w in grid]
    np.testing.assert_allclose(errors, direct, rtol=1e-9, atol=1e-15)


def test_a_member_with_non_finite_rollouts_gets_no_weight():
    residuals = [np.ones((1, 3, 2)), np.full((1, 3, 2), np.inf)]
    errors = blend_errors(residuals, np.ones((1, 3), dtype=bool), simplex_grid(2, 3))
    assert np.isinf(errors[:-1]).all() and errors[-1] == pytest.approx(1.0)  # the last: all on the first


def test_the_weight_goes_to_the_member_that_is_exactly_right(linear_runs):
    sim = BlendSimulator(members=("mean_curve", "linear"), member_params={"linear": {"lam": 1e-8}}).fit(linear_runs)
    np.testing.assert_array_equal(sim.weights_, [0.0, 1.0])
    assert sim.val_runs_ == [linear_runs[8].name, linear_runs[9].name]
    assert sim.validation_mse_.shape == (21,) and sim.validation_mse_[0] < 1e-12 < sim.validation_mse_[-1]
    assert sim.members_[1].train_runs_ == linear_runs.run_names  # refitted on every training run


def test_a_blend_simulates_the_weighted_sum_of_its_members(fixed_blend, linear_runs):
    runs = [linear_runs[i] for i in (0, 3)]
    curricula, initial = [run.curriculum.remove([2, 5]) for run in runs], np.stack([r.initial_losses for r in runs])
    linear, additive = fixed_blend.members_
    expected = 0.3 * linear.simulate(curricula, initial) + 0.7 * additive.simulate(curricula, initial)
    np.testing.assert_allclose(fixed_blend.simulate(curricula, initial), expected, rtol=1e-12)


def test_exact_leave_one_out_equals_re_simulating_the_leave_one_out_curricula(fixed_blend, linear_runs):
    run = linear_runs[0]
    assert fixed_blend.tags["exact_loo"] and not BlendSimulator.tags["exact_loo"]
    for step in (None, 7):
        exact = fixed_blend.leave_one_out(run.curriculum, run.initial_losses, step=step)
        resimulated = Simulator.leave_one_out(fixed_blend, run.curriculum, run.initial_losses, step=step)
        np.testing.assert_allclose(exact, resimulated, atol=1e-12)
    with_baseline = BlendSimulator(members=("linear", "mean_curve"), weight=[0.5, 0.5]).fit(linear_runs)
    assert not with_baseline.tags["exact_loo"]


def test_a_saved_blend_loads_back_equal(tmp_path, linear_runs):
    sim = BlendSimulator(members=("mean_curve", "linear", "additive"), weight_grid=5).fit(linear_runs)
    loaded = load_simulator(sim.save(tmp_path / "blend.npz"))
    assert loaded.get_params() == sim.get_params() and loaded.tags == sim.tags
    np.testing.assert_array_equal(loaded.weights_, sim.weights_)
    np.testing.assert_array_equal(loaded.validation_mse_, sim.validation_mse_)
    assert [type(m) for m in loaded.members_] == [type(m) for m in sim.members_]
    run = linear_runs[9]
    np.testing.assert_array_equal(loaded.simulate(run.curriculum, run.initial_losses),
                                  sim.simulate(run.curriculum, run.initial_losses))


@pytest.mark.parametrize(
    "edit_meta, edit_arrays, message",
    [
        (None, lambda a: a.pop("member0.B_"), r"member 0: missing arrays \['B_'\]"),
        (None, lambda a: a.update({"member2.A_": np.zeros(2)}), r"unexpected arrays \['member2.A_'\]"),
        (lambda m: m["state"]["members_"][1].update(kind="os.system"), None, "member 1: unknown simulator kind"),
        (lambda m: m["state"].update(members_={"kind": "linear"}), None, "bad parts"),
        (lambda m: m["state"]["members_"].pop(), None, r"unexpected arrays \['member1.A_'"),
        (None, lambda a: a.update(weights_=np.array([0.9, 0.9])), "not convex"),
        (lambda m: m["params"].update(members=["linear", "mean_curve"]), None, "inconsistent"),
    ],
)
def test_a_tampered_blend_file_is_one_clear_error(tmp_path, fixed_blend, edit_meta, edit_arrays, message,
                                                  rewrite_model):
    path = rewrite_model(fixed_blend.save(tmp_path / "blend.npz"), edit_meta, edit_arrays)
    with pytest.raises(ModelFileError, match=message):
        load_simulator(path)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"members": ("linear", "nope")}, "unknown method 'nope'"),
        ({"members": "linear"}, "members must be a non-empty list"),
        ({"members": ("linear", "linear")}, "name a method twice"),
        ({"members": ("linear", "fixed_effects")}, "cannot be a blend member"),
        ({"members": ("linear", "additive"), "weight": [0.5, 0.6]}, "summing to 1"),
        ({"members": ("linear", "additive"), "weight": [1.0]}, "2 non-negative numbers"),
        ({"members": ("linear", "additive"), "weight_grid": 1}, "weight_grid must be an integer >= 2"),
        ({"members": ("linear", "additive"), "weight_grid": 1e8}, "weight_grid must be an integer >= 2, got 1000000"),
        ({"members": ("linear", "additive"), "weight_grid": 10**8}, "weight_grid=100000000 gives 100000000 weight "
                                                                    "vectors for 2 members, more than 100000"),
        ({"members": ("linear", "additive", "mean_curve"), "weight_grid": 500}, "gives 125250 weight vectors"),
        ({"members": ("linear", "additive"), "weight": [0.5, 0.5], "weight_grid": 10**8}, "more than 100000"),
        ({"members": ("linear", "additive"), "val_fraction": "x"}, "val_fraction must be a number in \\(0, 1\\)"),
        ({"members": ("linear", "additive"), "val_fraction": 1.5}, "val_fraction must be a number in"),
        ({"members": ("linear", "additive"), "member_params": {"mean_curve": {}}}, "member_params must map"),
        ({"members": ("linear", "additive"), "member_params": {"linear": {"hessian": 1}}}, "no option 'hessian'"),
    ],
)
def test_bad_options_are_one_clear_error(linear_runs, params, message, monkeypatch):
    def no_fitting(*args, **kwargs):
        raise AssertionError("a member was fitted before the options were checked")
    monkeypatch.setattr(BlendSimulator, "_fit_member", no_fitting)
    with pytest.raises(SimfluenceError, match=message):
        BlendSimulator(**params).fit(linear_runs)


def test_choosing_weights_needs_a_validation_run(linear_runs):
    with pytest.raises(SimfluenceError, match="at least 2 training runs"):
        BlendSimulator(members=("linear", "additive")).fit(linear_runs, runs=[0])


def test_blend_is_a_registered_method_that_needs_checkpoints():
    assert METHODS["blend"].simulator_class() is BlendSimulator
    assert {"task", "checkpoints"} <= METHODS["blend"].needs


# ----------------------------------------------------------------------------- with a gradient member
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_blend_with_tracin_fits_predicts_and_round_trips(tmp_path_factory):
    from simfluence.workloads import generate_digits

    out = tmp_path_factory.mktemp("digits") / "ckpt"
    runset = generate_digits(out, n_runs=6, n_steps=12, batch_size=4, pool_size=30, test_size=8,
                             checkpoint_steps=(0, 6, 12), workers=1, progress=False)
    sim = BlendSimulator(members=("linear_step", "tracin_offset"), weight_grid=11).fit(runset, runs=range(5))
    assert sim.tags["exact_loo"] and sim.weights_.sum() == pytest.approx(1.0)
    run = runset[5]
    predicted = sim.simulate(run.curriculum, run.initial_losses)
    assert predicted.shape == (1, 13, 8) and (predicted >= 0).all()
    loaded = load_simulator(sim.save(tmp_path_factory.mktemp("model") / "blend.npz"))
    np.testing.assert_array_equal(loaded.simulate(run.curriculum, run.initial_losses), predicted)
    np.testing.assert_allclose(loaded.leave_one_out(run.curriculum, run.initial_losses),
                               Simulator.leave_one_out(sim, run.curriculum, run.initial_losses), atol=1e-12)
