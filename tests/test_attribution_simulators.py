"""Gradient-based methods as additive simulators: calibration, first-order agreement, save/load, evaluate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simfluence.attribution.checkpoints import load_checkpoints, model_at
from simfluence.attribution.simulators import InfluenceSimulator, TracInSimulator, TrackStarSimulator
from simfluence.curriculum import random_curricula
from simfluence.errors import SimfluenceError
from simfluence.evaluation import evaluate
from simfluence.methods import load_simulator, make_simulator
from simfluence.runlog import Run, RunSet
from simfluence.simulators import FixedEffectsSimulator
from simfluence.workloads import generate_digits, task_from_runset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """6 digits runs of 12 steps over a pool of 30, checkpoints at steps 0, 6 and 12."""
    out = tmp_path_factory.mktemp("digits") / "ckpt"
    return generate_digits(out, n_runs=6, n_steps=12, batch_size=4, pool_size=30, test_size=8,
                           checkpoint_steps=(0, 6, 12), workers=1, progress=False)


def known_scale_runset(scale, n_runs=6, n_steps=10, n_pool=12, n_test=4, seed=0):
    """Runs whose losses follow a FixedEffectsSimulator with known scores and ``scale`` exactly."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(2, n_pool, n_test))
    truth = FixedEffectsSimulator(clip_negative=False).set_scores(scores, [0, 5])
    truth.scale_ = np.broadcast_to(np.asarray(scale, dtype=float), (n_test,)).copy()
    truth.lr_schedule_ = np.full(n_steps, np.nan)
    truth.loss_floor_, truth.fitted_ = None, True
    curricula = random_curricula(n_runs, n_pool, 3, n_steps, seed=seed)
    rates = [np.linspace(0.1, 0.02, n_steps) for _ in curricula]
    initial = rng.uniform(2, 3, size=(n_runs, n_test))
    losses = truth.simulate(curricula, initial, rates)
    runs = [Run(f"run-{r}", curricula[r], np.arange(n_steps + 1), losses[r], rates[r]) for r in range(n_runs)]
    return RunSet(runs, n_pool=n_pool), scores


@pytest.mark.parametrize("calibration", ["rollout", "step"])
def test_calibration_recovers_a_known_global_scale(calibration):
    runset, scores = known_scale_runset(2.5)
    sim = FixedEffectsSimulator(calibration=calibration, clip_negative=False).set_scores(scores, [0, 5])
    sim.fit(runset)
    np.testing.assert_allclose(sim.scale_, 2.5, rtol=1e-9)
    assert sim.calibration_mse_ < 1e-20


def test_per_test_calibration_recovers_per_test_scales():
    runset, scores = known_scale_runset([0.5, 1.0, -2.0, 3.0])
    sim = FixedEffectsSimulator(scale="per_test", clip_negative=False).set_scores(scores, [0, 5]).fit(runset)
    np.testing.assert_allclose(sim.scale_, [0.5, 1.0, -2.0, 3.0], rtol=1e-9)


def test_a_scale_set_in_place_after_simulating_is_used_by_the_next_simulation():
    """The effect table is cached between simulations; editing ``scale_[:]`` in place must not leave it stale."""
    runset, scores = known_scale_runset(2.0)
    sim = FixedEffectsSimulator(clip_negative=False).set_scores(scores, [0, 5]).fit(runset)
    run = runset[0]
    before = sim.simulate(run.curriculum, run.initial_losses, [run.learning_rates])[0] - run.initial_losses
    sim.scale_[:] = 2 * sim.scale_
    after = sim.simulate(run.curriculum, run.initial_losses, [run.learning_rates])[0] - run.initial_losses
    np.testing.assert_allclose(after, 2 * before, rtol=1e-9, atol=1e-12)


def test_scores_must_be_set_before_fitting_a_fixed_effects_simulator(small_runset):
    with pytest.raises(SimfluenceError, match="no scores"):
        FixedEffectsSimulator().fit(small_runset)


def test_digits_task_is_rebuilt_from_the_manifest(tiny_digits):
    task = task_from_runset(tiny_digits)
    (final,) = load_checkpoints(tiny_digits, 0, steps=[12])
    model = model_at(task.make_model(0), final)
    with torch.no_grad():
        losses = task.loss_fn(model(task.test_inputs), task.test_targets).numpy()
    np.testing.assert_allclose(losses, tiny_digits[0].losses[-1], rtol=1e-6)  # same model, data and loss
    assert task.lr_at(3) == pytest.approx(tiny_digits[0].learning_rates[2])


def test_checkpoints_load_with_their_learning_rates_and_optimizer_state(tiny_digits):
    checkpoints = load_checkpoints(tiny_digits, 0)
    assert [c.step for c in checkpoints] == [0, 6, 12]
    assert checkpoints[1].learning_rate == pytest.approx(float(tiny_digits[0].learning_rates[5]))
    assert "state" in checkpoints[2].optimizer_state
    with pytest.raises(SimfluenceError, match="no checkpoint at step 4"):
        load_checkpoints(tiny_digits, 0, steps=[4])


def test_tracin_with_unit_scale_predicts_the_first_sgd_step(tiny_digits):
    run = tiny_digits[0]
    sim = TracInSimulator().fit(tiny_digits, runs=range(4))
    sim.scale_[:] = 1.0  # first-order theory: one SGD step changes the loss by -lr * g_batch . g_test
    predicted = sim.simulate(run.curriculum, run.initial_losses, [run.learning_rates])[0, 1] - run.initial_losses
    actual = run.losses[1] - run.losses[0]  # step 1: empty momentum buffer, weights of checkpoint 0
    np.testing.assert_allclose(predicted, actual, atol=0.05 * np.abs(actual).max())  # up to second order


def test_gradient_methods_on_a_run_set_of_chosen_tests_answer_those_columns(tiny_digits):
    chosen = tiny_digits.select_tests([5, 1])  # in memory, still beside its checkpoints
    assert task_from_runset(chosen).n_test == 2
    run = tiny_digits[5]
    # one scale per test example: a global scale is fitted over the test columns there are
    for make in (lambda: TracInSimulator(scale="per_test", check_linearity=False),
                 lambda: InfluenceSimulator(scale="per_test", check_linearity=False)):
        full = make().fit(tiny_digits, runs=range(4)).simulate(run.curriculum, run.initial_losses)
        some = make().fit(chosen, runs=range(4)).simulate(run.curriculum, run.initial_losses[[5, 1]])
        np.testing.assert_allclose(some, full[..., [5, 1]], rtol=1e-6, atol=1e-9)


def test_gradient_simulators_save_and_load_without_pickle(tiny_digits, tmp_path):
    for sim in (TracInSimulator(variant="cosine", params="last_layer"), InfluenceSimulator(params="last_layer"),
                TrackStarSimulator(projection_dim=64)):
        sim.fit(tiny_digits, runs=range(4))
        loaded = load_simulator(sim.save(tmp_path / f"{sim.kind}.npz"))
        assert type(loaded) is type(sim) and loaded.get_params() == sim.get_params()
        if sim.kind == "trackstar":  # the digits runs use momentum SGD: no second moment to correct by
            assert loaded.info_[0]["optimizer_correction"].startswith("skipped")
        run = tiny_digits[5]
        np.testing.assert_array_equal(loaded.simulate(run.curriculum, run.initial_losses),
                                      sim.simulate(run.curriculum, run.initial_losses))


def test_evaluate_scores_gradient_methods_next_to_learned_ones(tiny_digits):
    result = evaluate(tiny_digits, methods=["mean_curve", "tracin", "influence", "trackstar"], holdout=2,
                      params={"influence": {"hessian": "exact", "params": "last_layer"}})
    assert set(result.metrics) == {"mean_curve", "tracin", "influence", "trackstar"}
    assert result.simulators["tracin"].checkpoint_run_names_ == ["run-000"]  # a training run's checkpoints
    for name in ("tracin", "influence", "trackstar"):
        assert result.predicted[name].shape == (2, 13, 8)
        assert np.all(result.simulators[name].scale_ > 0)  # the scores point the way the losses moved
    # over 12 steps first-order TracIn is close to exact: it beats the curriculum-blind baseline on held-out runs
    assert result.metrics["tracin"]["all_mse"] < 0.5 * result.metrics["mean_curve"]["all_mse"]


def test_methods_are_registered_by_name():
    assert isinstance(make_simulator("tracin"), TracInSimulator)
    assert make_simulator("tracin_cos").variant == "cosine"
    assert isinstance(make_simulator("influence"), InfluenceSimulator)
    assert isinstance(make_simulator("trackstar"), TrackStarSimulator)
    assert make_simulator("trackstar_no_opt").optimizer_correction is False
    with pytest.raises(SimfluenceError, match="method 'tracin' has no option 'lam'"):
        make_simulator("tracin", lam=1.0)
    with pytest.raises(SimfluenceError, match="method 'trackstar' has no option 'lam'"):
        make_simulator("trackstar", lam=1.0)  # the Hessian mixing weight is hessian_mix, not a ridge strength


def test_gradient_leave_one_out_is_exact_with_time_varying_scores(tiny_digits):
    from simfluence.simulators import Simulator

    sim = TracInSimulator(params="last_layer", clip_negative=False).fit(tiny_digits, runs=range(4))
    assert len(sim.scores_) == 3  # one score matrix per checkpoint
    run = tiny_digits[5]
    exact = sim.leave_one_out(run.curriculum, run.initial_losses, run.learning_rates)
    brute = Simulator.leave_one_out(sim, run.curriculum, run.initial_losses, run.learning_rates)
    np.testing.assert_allclose(exact, brute, atol=1e-12 * max(1.0, np.abs(brute).max()))
    assert np.abs(brute).max() > 0


def test_a_digits_run_set_without_checkpoints_is_a_clear_error(tmp_path):
    runset = generate_digits(tmp_path / "plain", n_runs=2, n_steps=3, batch_size=4, pool_size=10, test_size=4,
                             workers=1, progress=False)
    with pytest.raises(SimfluenceError, match="has no checkpoints.*--checkpoint-steps"):
        TracInSimulator().fit(runset)


def test_a_run_set_of_no_known_workload_is_a_clear_error(tmp_runset):
    with pytest.raises(SimfluenceError, match="--task"):
        InfluenceSimulator().fit(tmp_runset)


def test_mean_curve_offset_makes_zero_scores_the_mean_curve(tmp_path):
    from simfluence.simulators import MeanCurve

    runset, scores = known_scale_runset(1.5)
    sim = FixedEffectsSimulator(offset="mean_curve", scale="per_test", clip_negative=False)
    sim.set_scores(np.zeros_like(scores), [0, 5]).fit(runset, runs=range(4))
    baseline = MeanCurve().fit(runset, runs=range(4))
    run = runset[5]
    np.testing.assert_allclose(sim.simulate(run.curriculum, run.initial_losses),
                               baseline.simulate(run.curriculum, run.initial_losses), atol=1e-12)
    fitted = FixedEffectsSimulator(offset="mean_curve", clip_negative=False).set_scores(scores, [0, 5])
    fitted.fit(runset, runs=range(4))
    loaded = load_simulator(fitted.save(tmp_path / "offset.npz"))
    np.testing.assert_array_equal(loaded.offset_, fitted.offset_)
    np.testing.assert_array_equal(loaded.simulate(run.curriculum, run.initial_losses),
                                  fitted.simulate(run.curriculum, run.initial_losses))


@pytest.mark.parametrize("make", [TracInSimulator, InfluenceSimulator, TrackStarSimulator])
def test_a_task_whose_checkpoints_do_not_give_the_logged_losses_is_refused(tiny_digits, make):
    """Shuffled test rows: the checkpoints' test losses are not the logged ones, so scores would belong to
    other test examples than the run set's; the fit stops with one line instead."""
    from dataclasses import replace

    from simfluence.errors import TaskError

    task = task_from_runset(tiny_digits)
    order = torch.arange(task.n_test).flip(0)
    shuffled = replace(task, test_inputs=task.test_inputs[order], test_targets=task.test_targets[order])
    with pytest.raises(TaskError):
        make().fit(tiny_digits, [0], task=shuffled)


GRADIENT_METHODS = {"tracin": TracInSimulator, "influence": InfluenceSimulator,
                    "trackstar": lambda **kw: TrackStarSimulator(projection_dim=16, **kw)}
# on a CPU-only machine the device path is exercised with device="cpu" (TracIn); with a GPU every method runs there
DEVICE_CASES = [("tracin", "cpu")] + ([(name, "cuda") for name in GRADIENT_METHODS] if torch.cuda.is_available()
                                      else [])


@pytest.mark.parametrize(("method", "device"), DEVICE_CASES)
def test_gradient_methods_give_the_same_scores_on_every_device(tiny_digits, method, device):
    """The scores are computed where ``device`` says (a GPU when lent: benchmarks/device_check.sh runs this test
    there) and agree with the CPU's; the model the task builds is moved, the data follow chunk by chunk."""
    make = GRADIENT_METHODS[method]
    reference, _ = make().compute_scores(tiny_digits, 0)
    scores, _ = make(device=device).compute_scores(tiny_digits, 0)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


def test_a_device_that_torch_does_not_know_is_one_clear_error(tiny_digits):
    with pytest.raises(SimfluenceError, match="device 'gpu0' is not a torch device"):
        TracInSimulator(device="gpu0").fit(tiny_digits)


def test_gradient_methods_record_their_replayed_removal_check_and_keep_it_when_saved(tiny_digits, tmp_path):
    """fit retrains one small removal of its first training run and compares it with its own prediction; the
    result (real and predicted mean change, ok) is kept in ``linearity_`` and in the model file."""
    checked = TracInSimulator().fit(tiny_digits, runs=range(4))
    check = checked.linearity_
    assert check["removed"] and np.isfinite(check["replayed_mean"]) and np.isfinite(check["predicted_mean"])
    assert check["replayed_mean"] != 0 and isinstance(check["ok"], bool)
    checked.save(tmp_path / "tracin")
    assert load_simulator(tmp_path / "tracin").linearity_ == check
    assert TracInSimulator(check_linearity=False).fit(tiny_digits, runs=range(4)).linearity_ is None
