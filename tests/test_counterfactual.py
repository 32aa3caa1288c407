"""Counterfactual queries: edits, batched what-if, leave-one-out tables and greedy curriculum search."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from simfluence.counterfactual import (
    Edit,
    apply_edits,
    loo_effects,
    parse_edit,
    search_curriculum,
    whatif,
)
from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, SimfluenceError, UnknownIdError
from simfluence.ids import IdIndex
from simfluence.runlog import RunSet
from simfluence.simulators import MeanCurve, SimfluenceLinear
from simfluence.synthetic import known_linear_runset

# external ids that differ from positions: pool id of position p is 100 + 7 p, test ids are strings
POOL_IDS = [100 + 7 * p for p in range(25)]
TEST_IDS = ["t0", "t1", "t2", "t10"]


def pid(position: int) -> int:
    return POOL_IDS[position]


@pytest.fixture(scope="module")
def fitted():
    synthetic, _, _ = known_linear_runset(n_pool=25, n_test=4, n_runs=8, n_steps=30, batch_size=4, seed=0)
    runset = RunSet(synthetic.runs, pool_ids=POOL_IDS, test_ids=TEST_IDS)
    return runset, SimfluenceLinear(lam=1.0, alpha_center=1.0, momentum=0.3).fit(runset)


@pytest.mark.parametrize("text", ["remove:1,2", "keep:1,2,3", "duplicate:5", "duplicate:5@10", "move:5@12",
                                  "move:5#2@12", "swap:3,7", "reverse", "replace:3>9", "truncate:20"])
def test_parse_edit_round_trips(text):
    assert str(parse_edit(text)) == text


@pytest.mark.parametrize("text", ["remove:", "move:5", "swap:1", "shuffle", "swap:a,b", "reverse:3", "move:5@x"])
def test_bad_edits_are_clear_errors(text):
    with pytest.raises(CurriculumError):
        parse_edit(text)


def test_apply_edits_resolve_external_ids(fitted):
    runset, _ = fitted
    cur, pool = runset[0].curriculum, runset.pool_index
    present = np.flatnonzero(cur.counts(25) > 0)
    a, b = int(present[0]), int(present[1])
    assert apply_edits(cur, [f"remove:{pid(a)},{pid(b)}", "reverse"], pool) == cur.remove([a, b]).reverse()
    assert apply_edits(cur, [Edit("remove", (pid(a),))], pool) == cur.remove([a])
    assert apply_edits(cur, [Edit("swap", (1, 2))], pool) == cur.swap_batches(1, 2)
    assert apply_edits(cur, [f"duplicate:{pid(a)}@3"], pool) == cur.duplicate(a, step=3)


def test_an_edit_naming_an_absent_or_unknown_example_is_an_error(fitted):
    runset, sim = fitted
    run = runset[0]
    cur = run.curriculum.keep_only(range(10))
    absent = pid(20)
    with pytest.raises(CurriculumError, match=f"pool id {absent} does not occur"):
        apply_edits(cur, [f"remove:{absent}"], runset.pool_index)
    with pytest.raises(CurriculumError, match="does not occur"):
        apply_edits(cur, [f"move:{absent}@3"], runset.pool_index)
    with pytest.raises(UnknownIdError, match="unknown pool id '3'"):  # a position is not an id
        whatif(sim, run, {"x": "remove:3"})
    # adding an example that the base lacks at a given step is a legitimate edit
    assert apply_edits(cur, [f"duplicate:{absent}@2"], runset.pool_index).counts(25)[20] == 1


def test_whatif_batches_scenarios_and_reports_change(fitted):
    runset, sim = fitted
    run = runset[0]
    present = np.flatnonzero(run.curriculum.counts(25) > 0)
    a, b = int(present[3]), int(present[4])
    result = whatif(sim, run, {"drop": [f"remove:{pid(a)},{pid(b)}"], "rev": "reverse"})
    assert result.names == ["base", "drop", "rev"]
    np.testing.assert_allclose(result.trajectories[0], sim.simulate(run.curriculum, run.initial_losses)[0])
    expected = sim.simulate(run.curriculum.remove([a, b]), run.initial_losses)[0]
    np.testing.assert_allclose(result.trajectories[1], expected)
    np.testing.assert_allclose(result.change[1], expected - result.trajectories[0])
    assert np.abs(result.change[1, -1]).max() > 1e-4  # removing two examples changes the prediction
    assert result.test_ids == TEST_IDS and list(result.final().columns) == TEST_IDS
    summary = result.summary(tests=["t10"])
    np.testing.assert_allclose(summary.loc["drop", "mean_change"], result.change[1, -1, 3])
    frame = result.frame()
    assert list(frame.columns) == ["scenario", "step", "test", "loss", "change"]
    assert len(frame) == 3 * 31 * 4
    assert result.final().shape == (3, 4)
    assert list(result.summary().columns) == ["mean_final_loss", "mean_change", "improved_tests", "worsened_tests"]


def test_loo_effects_exact_path_equals_generic_path(fitted):
    from simfluence.simulators import Simulator

    runset, sim = fitted
    run = runset[2]
    assert SimfluenceLinear.tags["exact_loo"] and not MeanCurve.tags["exact_loo"]
    exact = loo_effects(sim, run)
    generic = Simulator.leave_one_out(sim, run.curriculum, run.initial_losses, chunk=7)  # re-simulation
    np.testing.assert_allclose(exact.effects, generic, atol=1e-10)
    frame = exact.frame()
    assert set(frame["rank"]) == set(range(1, int(exact.present.sum()) + 1))
    assert set(frame["pool"]) <= set(POOL_IDS) and set(frame["test"]) == set(TEST_IDS)
    top = exact.top(3, tests=["t0"])
    assert list(top["role"]) == ["helps"] * 3 + ["hurts"] * 3
    assert top["effect"].iloc[0] >= top["effect"].iloc[2]
    best = top["pool"].iloc[0]
    assert exact.effect(best, "t0") == top["effect"].iloc[0]
    np.testing.assert_allclose(exact.effect(best, "t0"), exact.effects[POOL_IDS.index(best), 0])
    with pytest.raises(UnknownIdError, match="unknown test id 0"):
        exact.top(3, tests=[0])


def test_loo_effects_of_the_mean_curve_are_zero(fitted):
    runset, _ = fitted
    effects = loo_effects(MeanCurve().fit(runset), runset[0])
    assert np.all(effects.effects == 0)


def test_search_drop_lowers_the_target_loss_monotonically(fitted):
    runset, sim = fitted
    run = runset[3]
    result = search_curriculum(sim, run, tests=["t0", "t1"], drop=4)
    assert len(result.removed) <= 4 and result.predicted_change < 0
    assert np.all(np.diff(result.objective) < 0)
    assert set(result.removed) <= set(POOL_IDS)
    assert result.curriculum == run.curriculum.remove([POOL_IDS.index(i) for i in result.removed])
    up = search_curriculum(sim, run, tests=["t0", "t1"], drop=2, maximize=True)
    assert up.predicted_change > 0


def test_search_subset_keeps_the_requested_number(fitted):
    runset, sim = fitted
    run = runset[3]
    result = search_curriculum(sim, run.curriculum, tests=["t2"], subset_size=10, per_round=3,
                               initial_losses=run.initial_losses)
    assert int((result.curriculum.counts(25) > 0).sum()) == 10
    with pytest.raises(SimfluenceError, match="exactly one budget"):
        search_curriculum(sim, run, tests=["t2"])
    with pytest.raises(SimfluenceError, match="needs initial_losses"):
        search_curriculum(sim, run.curriculum, tests=["t2"], drop=1)


def test_influence_table_ranks_proponents_and_opponents(fitted):
    from simfluence.counterfactual import influence_table

    runset, sim = fitted
    table = influence_table(sim, runset, 2, tests=["t0", "t10"], top=3)
    assert list(table.columns) == ["test", "pool", "score", "rank", "role"]
    assert set(table["test"]) == {"t0", "t10"} and len(table) == 12
    for _, group in table.groupby("test"):
        assert group["score"].is_monotonic_decreasing
        assert group["role"].iloc[0] == "proponent" and group["role"].iloc[-1] == "opponent"


def test_loo_effects_of_a_fixed_effects_simulator_are_its_summed_effects(fitted):
    from simfluence.simulators import FixedEffectsSimulator

    runset, _ = fitted
    scores = np.random.default_rng(0).normal(size=(25, 4))
    sim = FixedEffectsSimulator(weighting="sum", clip_negative=False).set_scores(scores).fit(runset, runs=range(6))
    run = runset[7]
    effects = loo_effects(sim, run)
    counts = run.curriculum.counts(25)
    # additive and order-free: removing i undoes each of its occurrences' effect -s * score_i
    np.testing.assert_allclose(effects.effects, counts[:, None] * sim.scale_ * scores, atol=1e-10)


def test_search_order_keeps_the_examples_and_improves_the_objective(fitted):
    from simfluence.counterfactual import move_all, search_order

    runset, sim = fitted
    run = runset[3]
    result = search_order(sim, run, tests=["t0", "t1"], moves=3, candidates=5)
    assert np.array_equal(result.curriculum.counts(25), run.curriculum.counts(25))  # same examples, same counts
    assert len(result.moves) >= 1 and result.predicted_change < 0
    assert np.all(np.diff(result.objective) < 0)
    example, where = result.moves[0]
    assert example in POOL_IDS
    position = IdIndex(POOL_IDS, "pool").position(example)
    first = move_all(run.curriculum, position, 1 if where == "start" else run.curriculum.n_steps)
    np.testing.assert_allclose(sim.simulate(first, run.initial_losses)[0, -1, [0, 1]].mean(), result.objective[1])


def test_top_labels_follow_the_sign_of_the_effect(fitted):
    runset, sim = fitted
    effects = loo_effects(sim, runset[0])
    top = effects.top(50)
    assert np.all(top.loc[top["role"] == "helps", "effect"] > 0)
    assert np.all(top.loc[top["role"] == "hurts", "effect"] < 0)
    assert not top["pool"].duplicated().any()


def _entries_in_order(curriculum: Curriculum) -> list[int]:
    return [int(i) for i in curriculum.ids]


def test_moving_every_occurrence_to_the_end_keeps_every_batch_size():
    from simfluence.counterfactual import move_all

    cur = Curriculum.from_batches([[0, 1, 2], [3, 0, 4], [5, 6, 0], [1, 7, 8], [9, 10, 11], [12, 13, 14]], n_pool=15)
    moved = move_all(cur, [0, 1], to_step=cur.n_steps)
    np.testing.assert_array_equal(moved.batch_sizes, cur.batch_sizes)
    # the 5 occurrences of 0 and 1 are the last 5 entries, in their order; the others keep theirs
    assert _entries_in_order(moved) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1, 0, 0, 1]
    assert moved.batches()[-1].tolist() == [0, 0, 1] and np.array_equal(moved.counts(15), cur.counts(15))
    start = move_all(cur, 0, to_step=1)  # to the first entries
    assert _entries_in_order(start)[:3] == [0, 0, 0] and np.array_equal(start.batch_sizes, cur.batch_sizes)


def test_a_move_to_a_middle_step_starts_at_that_batch_and_shifts_one_entry_per_batch_boundary():
    from simfluence.counterfactual import move_all

    cur = Curriculum.from_batches([[0, 1], [2, 3], [4, 5], [6, 7]], n_pool=8)
    assert move_all(cur, 1, to_step=3).batches()[2].tolist() == [1, 5]
    assert [b.tolist() for b in move_all(cur, 1, to_step=3).batches()] == [[0, 2], [3, 4], [1, 5], [6, 7]]
    assert [b.tolist() for b in move_all(cur, 6, to_step=2).batches()] == [[0, 1], [6, 2], [3, 4], [5, 7]]


def test_move_edit_moves_every_occurrence_and_the_hash_form_only_one(fitted):
    runset, _ = fitted
    cur = Curriculum.from_batches([[0, 1, 2, 3], [4, 0, 5, 6], [7, 8, 0, 9], [10, 11, 12, 13]], n_pool=25)
    pool = runset.pool_index
    every = apply_edits(cur, [f"move:{pid(0)}@4"], pool)
    assert every.batches()[-1].tolist() == [0, 0, 0, 13] and np.array_equal(every.batch_sizes, cur.batch_sizes)
    second = apply_edits(cur, [f"move:{pid(0)}#2@4"], pool)
    assert [b.tolist() for b in second.batches()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 9, 10], [0, 11, 12, 13]]
    with pytest.raises(CurriculumError, match="occurs 3 times"):
        apply_edits(cur, [f"move:{pid(0)}#4@4"], pool)
    with pytest.raises(CurriculumError, match="step 9 outside 1..4"):
        apply_edits(cur, [f"move:{pid(0)}@9"], pool)


def test_move_k_most_helpful_to_the_end_keeps_the_batch_sizes_of_training(fitted):
    from simfluence.apps.verify import counterfactual_curricula

    runset, sim = fitted
    run = runset[5]
    curricula = counterfactual_curricula(sim, run, ["t0", "t1"], k=6)
    moved = curricula["move 6 most helpful to the end"]
    np.testing.assert_array_equal(moved.batch_sizes, run.curriculum.batch_sizes)
    assert np.array_equal(moved.counts(25), run.curriculum.counts(25))


def test_queries_far_outside_the_batch_sizes_seen_in_training_warn(fitted):
    from simfluence.errors import ExtrapolationWarning

    runset, sim = fitted  # trained on batches of 4
    run = runset[0]
    crowded = ";".join([f"duplicate:{pid(1)}@5"] * 6)  # a batch of 10 at step 5
    with pytest.warns(ExtrapolationWarning, match=r"'crowded': step 5 has a batch of 10 examples; the training runs"):
        whatif(sim, run, {"crowded": crowded})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        whatif(sim, run, {"moved": f"move:{_present(run)}@30", "one more": f"duplicate:{pid(1)}@5"})


def _present(run) -> int:
    return pid(int(run.curriculum.ids[0]))


def test_the_edit_language_knows_no_simulator_and_queries_know_no_search():
    import ast
    from pathlib import Path

    import simfluence.counterfactual as package

    def imported(module: str) -> set[str]:
        tree = ast.parse((Path(package.__file__).parent / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert not {name for name in imported("edits") if name.startswith(("simfluence.counterfactual", "simfluence.sim"))}
    assert "simfluence.counterfactual.search" not in imported("queries")
    assert {"simfluence.counterfactual.edits", "simfluence.counterfactual.queries"} <= imported("search")
