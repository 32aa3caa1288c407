"""The unrolled-anchored simulator: unrolled's exact effects of one base run, rolled out for any curriculum."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from test_attribution_unrolled import wine_task

from simfluence.attribution.anchored import AnchoredSimulator
from simfluence.attribution.unrolled_simulator import UnrolledSimulator
from simfluence.counterfactual import move_all
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import SimfluenceError
from simfluence.methods import METHODS, load_simulator, make_simulator
from simfluence.training import generate_runs


@pytest.fixture(scope="module")
def wine_base(tmp_path_factory):
    """One logged run of 30 steps (batch 8, pool 48) of the SGD-momentum wine task, unrolled with every insertion
    step, and the anchored simulator fitted on it through the registry."""
    task = wine_task()
    runset = generate_runs(task, random_curricula(1, 48, 8, 30, seed=1), tmp_path_factory.mktemp("wine") / "runs",
                           workers=1, progress=False)
    unrolled = UnrolledSimulator(insertion_steps="all", check_linearity=False).fit(runset, runs=[0], task=task)
    anchored = make_simulator("unrolled_anchored", check_linearity=False).fit(runset, runs=[0], task=task)
    return runset, unrolled, anchored


def _edits(base: Curriculum) -> list[Curriculum]:
    """Small edits of the base (removal, duplication, move to the end, an absent example added) and a far one."""
    absent = int(np.setdiff1d(np.arange(48), base.batch(12))[0])
    return [base.remove([int(base.ids[3])]), base.duplicate(int(base.ids[5])),
            move_all(base, [int(base.ids[9])], base.n_steps), base.duplicate(absent, step=12),
            base.keep_only(np.unique(base.ids)[::2])]


def test_the_registry_builds_a_per_base_simulator_that_needs_a_task():
    assert isinstance(make_simulator("unrolled_anchored"), AnchoredSimulator)
    assert METHODS["unrolled_anchored"].needs == frozenset({"task"}) and METHODS["unrolled_anchored"].per_base


def test_the_base_curriculum_rolls_out_to_the_replayed_trajectory(wine_base):
    runset, unrolled, anchored = wine_base
    assert anchored.momentum_ == 0.9  # the replayed SGD's
    rolled = anchored.simulate(runset[0].curriculum, unrolled.base_losses_[0])[0]
    np.testing.assert_allclose(rolled, unrolled.base_losses_, rtol=0, atol=1e-12)


def test_final_losses_equal_unrolleds_for_every_curriculum_of_the_base_length(wine_base):
    runset, unrolled, anchored = wine_base
    curricula = _edits(runset[0].curriculum)
    initial = unrolled.base_losses_[0] + 0.05  # another start shifts both the same way
    expected = unrolled.simulate(curricula, initial)[:, -1]
    np.testing.assert_allclose(anchored.simulate(curricula, initial)[:, -1], expected, rtol=1e-10, atol=1e-12)
    assert np.abs(expected - unrolled.base_losses_[-1] - 0.05).min() > 1e-5  # the edits do change the losses


@pytest.mark.parametrize("momentum", ["auto", 0.0, 0.5])
def test_the_propagation_factor_is_the_final_losss_derivative_with_respect_to_an_impulse(wine_base, momentum):
    runset, unrolled, _ = wine_base
    sim = AnchoredSimulator(momentum=momentum).fit_unrolled(unrolled)
    base, initial = runset[0].curriculum, unrolled.base_losses_[0]
    for step in (1, 7, 30):
        nudged = copy.copy(sim)
        nudged.drift_ = sim.drift_.copy()
        nudged.drift_[step - 1] += 1e-3
        change = (nudged.simulate(base, initial)[0, -1] - sim.simulate(base, initial)[0, -1]) / 1e-3
        np.testing.assert_allclose(change, sim.propagation_[step - 1], rtol=1e-9)
    # so the momentum shapes the trajectory, never the final answer
    edited = base.remove([int(base.ids[3])])
    np.testing.assert_allclose(sim.simulate(edited, initial)[0, -1], unrolled.simulate(edited, initial)[0, -1],
                               rtol=1e-10)


def test_curricula_of_other_lengths_are_rolled_out(wine_base):
    runset, unrolled, sim = wine_base
    base, initial = runset[0].curriculum, unrolled.base_losses_[0]
    shorter, longer = base.truncate(12), base.concat(base.truncate(10))
    full, short, long = sim.simulate(base, initial)[0], *sim.simulate([shorter, longer], initial)
    np.testing.assert_allclose(short[:13], full[:13], rtol=0, atol=1e-12)  # a prefix is the rollout's prefix
    np.testing.assert_array_equal(short[13:], np.broadcast_to(short[12], short[13:].shape))  # then held
    np.testing.assert_allclose(long[:31], full, rtol=0, atol=1e-12)
    assert np.all(np.isfinite(long)) and np.abs(long[40] - long[30]).max() > 1e-6  # it keeps training


def test_a_step_without_insertion_effects_uses_the_nearest_insertion_step(wine_base):
    runset, unrolled, _ = wine_base
    base = runset[0].curriculum
    absent = int(np.setdiff1d(np.arange(48), base.batch(12))[0])
    added = base.duplicate(absent, step=12)

    def anchored_on(steps: list[int]) -> AnchoredSimulator:
        part = copy.copy(unrolled)
        rows = np.searchsorted(unrolled.insertion_steps_, steps)
        part.insertion_steps_ = unrolled.insertion_steps_[rows]
        part.insertion_effects_ = unrolled.insertion_effects_[rows]
        return AnchoredSimulator().fit_unrolled(part)

    predicted = {tuple(steps): anchored_on(steps).simulate(added, base_losses := unrolled.base_losses_[0])[0, -1]
                 for steps in ([5, 25], [5], [25])}
    np.testing.assert_array_equal(predicted[(5, 25)], predicted[(5,)])  # 12 is nearer to 5
    assert np.abs(predicted[(5, 25)] - predicted[(25,)]).max() > 1e-6
    with pytest.raises(SimfluenceError, match=f"pool id {absent} is added at step 12.*no insertion effects"):
        anchored_on([]).simulate(added, base_losses)
    anchored_on([]).simulate(base.remove([int(base.ids[0])]), base_losses)  # removals need none


def test_save_and_load_round_trip(wine_base, tmp_path):
    runset, _, anchored = wine_base
    loaded = load_simulator(anchored.save(tmp_path / "anchored.npz"))
    assert isinstance(loaded, AnchoredSimulator) and loaded.get_params() == anchored.get_params()
    assert loaded.base_run_ == runset[0].name and loaded.momentum_ == anchored.momentum_
    curricula = [*_edits(runset[0].curriculum), runset[0].curriculum.truncate(9)]
    np.testing.assert_array_equal(loaded.simulate(curricula, runset[0].initial_losses),
                                  anchored.simulate(curricula, runset[0].initial_losses))


def test_phase_effects_average_the_impulses_per_occurrence_over_each_phases_steps(wine_base):
    runset, unrolled, anchored = wine_base
    rates = runset[0].learning_rates
    effects = anchored.phase_effects([0, 15], learning_rates=rates)
    per_step = unrolled.insertion_effects_[:, :, -1, :] / anchored.propagation_[:, None, None]  # E_{t,i} / G_t
    per_step = per_step / (rates / rates.mean())[:, None, None]
    np.testing.assert_allclose(effects[0], per_step[:8].mean(axis=0), rtol=1e-6)  # steps 1..8 start nearer 0
    np.testing.assert_allclose(effects[1], per_step[8:].mean(axis=0), rtol=1e-6)
    single = anchored.phase_effects(range(30))  # one phase per step, no learning rates
    np.testing.assert_allclose(single[11], unrolled.insertion_effects_[11, :, -1, :] / anchored.propagation_[11],
                               rtol=1e-6)


def test_bad_options_are_one_line_errors(wine_base):
    _, unrolled, anchored = wine_base
    with pytest.raises(SimfluenceError, match="momentum must be a number in \\[0, 1\\)"):
        AnchoredSimulator(momentum=1.5).fit_unrolled(unrolled)
    with pytest.raises(SimfluenceError, match="phase_steps must be increasing"):
        anchored.phase_effects([10, 5])
