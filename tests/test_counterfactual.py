"""Counterfactual queries: edits, batched what-if, leave-one-out tables and greedy curriculum search."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.counterfactual import (
    Edit,
    _loo_by_simulation,
    apply_edits,
    loo_effects,
    parse_edit,
    search_curriculum,
    whatif,
)
from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.simulators import MeanCurve, SimfluenceLinear
from simfluence.synthetic import known_linear_runset


@pytest.fixture(scope="module")
def fitted():
    runset, _, _ = known_linear_runset(n_pool=25, n_test=4, n_runs=8, n_steps=30, batch_size=4, seed=0)
    return runset, SimfluenceLinear(lam=1.0, alpha_center=1.0, momentum=0.3).fit(runset)


@pytest.mark.parametrize("text", ["remove:1,2", "keep:1,2,3", "duplicate:5", "duplicate:5@10", "move:5@12",
                                  "swap:3,7", "reverse", "replace:3>9", "truncate:20"])
def test_parse_edit_round_trips(text):
    assert str(parse_edit(text)) == text


@pytest.mark.parametrize("text", ["remove:", "move:5", "swap:1", "shuffle", "remove:a", "reverse:3"])
def test_bad_edits_are_clear_errors(text):
    with pytest.raises(CurriculumError):
        parse_edit(text)


def test_apply_edits_matches_curriculum_methods(fitted):
    runset, _ = fitted
    cur = runset[0].curriculum
    assert apply_edits(cur, ["remove:1,2", "reverse"]) == cur.remove([1, 2]).reverse()
    assert apply_edits(cur, [Edit("swap", (1, 2))]) == cur.swap_batches(1, 2)


def test_whatif_batches_scenarios_and_reports_change(fitted):
    runset, sim = fitted
    run = runset[0]
    result = whatif(sim, run.curriculum, {"drop": ["remove:3,4"], "rev": ["reverse"]}, run.initial_losses,
                    test_ids=runset.test_ids)
    assert result.names == ["base", "drop", "rev"]
    expected = sim.simulate(run.curriculum.remove([3, 4]), run.initial_losses)[0]
    np.testing.assert_allclose(result.trajectories[1], expected)
    assert np.all(result.change[0] == 0)
    frame = result.frame()
    assert list(frame.columns) == ["scenario", "step", "test", "loss", "change"]
    assert len(frame) == 3 * 31 * 4
    assert result.final().shape == (3, 4)
    assert list(result.summary().columns) == ["mean_final_loss", "mean_change", "improved_tests", "worsened_tests"]


def test_loo_effects_exact_path_equals_generic_path(fitted):
    runset, sim = fitted
    run = runset[2]
    exact = loo_effects(sim, run.curriculum, run.initial_losses)
    generic = _loo_by_simulation(sim, run.curriculum, run.initial_losses, None, None, exact.present, 7)
    np.testing.assert_allclose(exact.effects, generic, atol=1e-10)
    frame = exact.frame()
    assert set(frame["rank"]) == set(range(1, int(exact.present.sum()) + 1))
    top = exact.top(3, tests=[0])
    assert list(top["role"]) == ["helps"] * 3 + ["hurts"] * 3
    assert top["effect"].iloc[0] >= top["effect"].iloc[2]


def test_loo_effects_of_the_mean_curve_are_zero(fitted):
    runset, _ = fitted
    effects = loo_effects(MeanCurve().fit(runset), runset[0].curriculum, runset[0].initial_losses)
    assert np.all(effects.effects == 0)


def test_search_drop_lowers_the_target_loss_monotonically(fitted):
    runset, sim = fitted
    run = runset[3]
    result = search_curriculum(sim, run.curriculum, run.initial_losses, tests=[0, 1], drop=4)
    assert len(result.removed) <= 4 and result.predicted_change < 0
    assert np.all(np.diff(result.objective) < 0)
    assert result.curriculum == run.curriculum.remove(result.removed)
    up = search_curriculum(sim, run.curriculum, run.initial_losses, tests=[0, 1], drop=2, maximize=True)
    assert up.predicted_change > 0


def test_search_subset_keeps_the_requested_number(fitted):
    runset, sim = fitted
    run = runset[3]
    result = search_curriculum(sim, run.curriculum, run.initial_losses, tests=[2], subset_size=10, per_round=3)
    assert int((result.curriculum.counts(25) > 0).sum()) == 10
    with pytest.raises(SimfluenceError, match="exactly one budget"):
        search_curriculum(sim, run.curriculum, run.initial_losses, tests=[2])


def test_influence_table_ranks_proponents_and_opponents(fitted):
    from simfluence.counterfactual import influence_table

    runset, sim = fitted
    table = influence_table(sim, runset, 2, tests=[0, 1], top=3)
    assert list(table.columns) == ["test", "pool", "score", "rank", "role"]
    assert set(table["test"]) == {0, 1} and len(table) == 12
    for _, group in table.groupby("test"):
        assert group["score"].is_monotonic_decreasing
        assert group["role"].iloc[0] == "proponent" and group["role"].iloc[-1] == "opponent"


def test_loo_effects_of_a_fixed_effects_simulator_are_its_summed_effects(fitted):
    from simfluence.simulators import FixedEffectsSimulator

    runset, _ = fitted
    scores = np.random.default_rng(0).normal(size=(25, 4))
    sim = FixedEffectsSimulator(weighting="sum", clip_negative=False).set_scores(scores).fit(runset, runs=range(6))
    run = runset[7]
    effects = loo_effects(sim, run.curriculum, run.initial_losses)
    counts = run.curriculum.counts(25)
    # additive and order-free: removing i undoes each of its occurrences' effect -s * score_i
    np.testing.assert_allclose(effects.effects, counts[:, None] * sim.scale_ * scores, atol=1e-10)


def test_search_order_keeps_the_examples_and_improves_the_objective(fitted):
    from simfluence.counterfactual import move_all, search_order

    runset, sim = fitted
    run = runset[3]
    result = search_order(sim, run.curriculum, run.initial_losses, tests=[0, 1], moves=3, candidates=5)
    assert np.array_equal(result.curriculum.counts(25), run.curriculum.counts(25))  # same examples, same counts
    assert len(result.moves) >= 1 and result.predicted_change < 0
    assert np.all(np.diff(result.objective) < 0)
    example, where = result.moves[0]
    first = move_all(run.curriculum, example, 1 if where == "start" else run.curriculum.n_steps)
    np.testing.assert_allclose(sim.simulate(first, run.initial_losses)[0, -1, [0, 1]].mean(), result.objective[1])


def test_top_labels_follow_the_sign_of_the_effect(fitted):
    runset, sim = fitted
    effects = loo_effects(sim, runset[0].curriculum, runset[0].initial_losses)
    top = effects.top(50)
    assert np.all(top.loc[top["role"] == "helps", "effect"] > 0)
    assert np.all(top.loc[top["role"] == "hurts", "effect"] < 0)
    assert not top["pool"].duplicated().any()
