"""Curricula and their counterfactual edits, checked against brute-force list manipulation."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from simfluence.curriculum import Curriculum, random_curricula, random_subset, shuffled_epochs, stack_csr
from simfluence.errors import CurriculumError

N_POOL = 12

batch_lists = st.lists(st.lists(st.integers(0, N_POOL - 1), max_size=6), min_size=1, max_size=8)


def as_lists(curriculum: Curriculum) -> list[list[int]]:
    return [batch.tolist() for batch in curriculum.batches()]


def dense_counts(batches: list[list[int]], n_pool: int) -> np.ndarray:
    counts = np.zeros((len(batches), n_pool))
    for row, batch in enumerate(batches):
        for example_id in batch:
            counts[row, example_id] += 1
    return counts


@st.composite
def curriculum_with_step(draw):
    batches = draw(batch_lists)
    return batches, draw(st.integers(1, len(batches)))


# ------------------------------------------------------------------ construction and views


@given(batch_lists)
def test_from_batches_round_trips_batches(batches):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    assert as_lists(curriculum) == batches
    assert len(curriculum) == curriculum.n_steps == len(batches)
    assert curriculum.batch_sizes.tolist() == [len(batch) for batch in batches]
    for step, batch in enumerate(batches, 1):
        assert curriculum.batch(step).tolist() == batch


@given(batch_lists)
def test_step_of_entries_names_each_entrys_step(batches):
    curriculum = Curriculum.from_batches(batches)
    expected = [step for step, batch in enumerate(batches, 1) for _ in batch]
    assert curriculum.step_of_entries().tolist() == expected


@given(batch_lists)
def test_to_csr_equals_brute_force_dense_counts(batches):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    matrix = curriculum.to_csr()
    assert isinstance(matrix, sp.csr_matrix)
    assert matrix.dtype == np.float64
    assert matrix.shape == (len(batches), N_POOL)
    np.testing.assert_array_equal(matrix.toarray(), dense_counts(batches, N_POOL))
    np.testing.assert_array_equal(curriculum.counts(), dense_counts(batches, N_POOL).sum(axis=0))


def test_to_csr_without_n_pool_uses_largest_id():
    curriculum = Curriculum.from_batches([[3, 3], [], [1]])
    assert curriculum.to_csr().shape == (3, 4)
    assert curriculum.to_csr(10).shape == (3, 10)
    assert curriculum.counts().tolist() == [0, 1, 0, 2]


def test_arrays_are_read_only_int64_copies():
    offsets = np.array([0, 2, 3])
    ids = np.array([4, 5, 6], dtype=np.int32)
    curriculum = Curriculum(offsets, ids, n_pool=7)
    ids[0] = 0
    assert curriculum.ids.tolist() == [4, 5, 6]
    assert curriculum.ids.dtype == curriculum.offsets.dtype == np.int64
    with pytest.raises(ValueError):
        curriculum.ids[0] = 1
    with pytest.raises(ValueError):
        curriculum.batch(1)[0] = 1
    with pytest.raises(AttributeError):
        curriculum.n_pool = 3


def test_pickle_and_copy_round_trip():
    curriculum = Curriculum.from_batches([[1, 2], [], [2]], n_pool=5)
    restored = pickle.loads(pickle.dumps(curriculum))
    assert restored == curriculum and restored.n_pool == 5
    assert copy.deepcopy(curriculum) == curriculum


def test_equality_and_repr():
    a = Curriculum.from_batches([[1, 2], [], [2]], n_pool=5)
    assert a == Curriculum(np.array([0, 2, 2, 3]), np.array([1, 2, 2]), n_pool=5)
    assert a != Curriculum.from_batches([[1, 2], [2], []], n_pool=5)
    assert a != Curriculum.from_batches([[2, 1], [], [2]], n_pool=5)
    assert repr(a) == "Curriculum(n_steps=3, n_entries=3, n_pool=5)"


def test_empty_curriculum():
    curriculum = Curriculum.from_batches([])
    assert curriculum.n_steps == 0
    assert curriculum.batches() == []
    assert curriculum.to_csr(4).shape == (0, 4)


# ------------------------------------------------------------------ edits vs brute force


@given(batch_lists, st.sets(st.integers(0, N_POOL - 1)))
def test_remove_drops_every_occurrence_and_keeps_steps(batches, dropped):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    edited = curriculum.remove(dropped)
    assert as_lists(edited) == [[i for i in batch if i not in dropped] for batch in batches]
    assert edited.n_pool == N_POOL
    assert as_lists(curriculum) == batches


@given(batch_lists, st.sets(st.integers(0, N_POOL - 1)))
def test_keep_only_restricts_to_subset(batches, kept):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    edited = curriculum.keep_only(np.array(sorted(kept), dtype=np.int64))
    assert as_lists(edited) == [[i for i in batch if i in kept] for batch in batches]
    assert as_lists(curriculum) == batches


@given(batch_lists, st.integers(0, N_POOL - 1))
def test_duplicate_doubles_every_occurrence(batches, example_id):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    edited = curriculum.duplicate(example_id)
    expected = [[j for i in batch for j in ([i, i] if i == example_id else [i])] for batch in batches]
    assert as_lists(edited) == expected
    assert as_lists(curriculum) == batches


@given(curriculum_with_step(), st.integers(0, N_POOL - 1))
def test_duplicate_into_step_adds_one_occurrence_there(batches_and_step, example_id):
    batches, step = batches_and_step
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    expected = [list(batch) for batch in batches]
    expected[step - 1].append(example_id)
    assert as_lists(curriculum.duplicate(example_id, step=step)) == expected
    assert as_lists(curriculum) == batches


@given(batch_lists, st.data())
def test_move_moves_first_occurrence(batches, data):
    present = sorted({i for batch in batches for i in batch})
    if not present:
        return
    example_id = data.draw(st.sampled_from(present))
    to_step = data.draw(st.integers(1, len(batches)))
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    expected = [list(batch) for batch in batches]
    from_index = next(k for k, batch in enumerate(expected) if example_id in batch)
    expected[from_index].remove(example_id)
    expected[to_step - 1].append(example_id)
    assert as_lists(curriculum.move(example_id, to_step)) == expected
    assert as_lists(curriculum) == batches


@given(curriculum_with_step(), st.data())
def test_move_from_step_moves_occurrence_of_that_step(batches_and_step, data):
    batches, from_step = batches_and_step
    if not batches[from_step - 1]:
        return
    example_id = data.draw(st.sampled_from(batches[from_step - 1]))
    to_step = data.draw(st.integers(1, len(batches)))
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    expected = [list(batch) for batch in batches]
    expected[from_step - 1].remove(example_id)
    expected[to_step - 1].append(example_id)
    assert as_lists(curriculum.move(example_id, to_step, from_step=from_step)) == expected


@given(batch_lists, st.integers(0, N_POOL - 1), st.integers(0, N_POOL - 1))
def test_replace_substitutes_every_occurrence(batches, old_id, new_id):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    expected = [[new_id if i == old_id else i for i in batch] for batch in batches]
    assert as_lists(curriculum.replace(old_id, new_id)) == expected
    assert as_lists(curriculum) == batches


@given(batch_lists, st.data())
def test_swap_batches_exchanges_two_steps(batches, data):
    step_a = data.draw(st.integers(1, len(batches)))
    step_b = data.draw(st.integers(1, len(batches)))
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    expected = [list(batch) for batch in batches]
    expected[step_a - 1], expected[step_b - 1] = expected[step_b - 1], expected[step_a - 1]
    assert as_lists(curriculum.swap_batches(step_a, step_b)) == expected
    assert as_lists(curriculum) == batches


@given(batch_lists)
def test_reverse_reverses_batch_order(batches):
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    assert as_lists(curriculum.reverse()) == batches[::-1]
    assert curriculum.reverse().reverse() == curriculum


@given(curriculum_with_step())
def test_truncate_keeps_first_steps(batches_and_step):
    batches, n_steps = batches_and_step
    curriculum = Curriculum.from_batches(batches, n_pool=N_POOL)
    assert as_lists(curriculum.truncate(n_steps)) == batches[:n_steps]
    assert curriculum.truncate(0).n_steps == 0


@given(batch_lists, batch_lists)
def test_concat_appends_steps(first, second):
    a = Curriculum.from_batches(first, n_pool=N_POOL)
    b = Curriculum.from_batches(second)
    joined = a.concat(b)
    assert as_lists(joined) == first + second
    assert joined.n_pool == N_POOL


# ------------------------------------------------------------------ random curricula


@pytest.mark.parametrize("n_pool, batch_size", [(10, 5), (10, 3), (7, 7), (5, 8)])
def test_shuffled_epochs_covers_every_id_once_per_epoch(n_pool, batch_size):
    steps_per_epoch = -(-n_pool // batch_size)
    curriculum = shuffled_epochs(n_pool, batch_size, n_steps=3 * steps_per_epoch, seed=0)
    assert curriculum.n_steps == 3 * steps_per_epoch
    for epoch in range(3):
        steps = range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
        ids = np.concatenate([curriculum.batch(step) for step in steps])
        assert sorted(ids.tolist()) == list(range(n_pool))


def test_shuffled_epochs_ragged_last_batch():
    curriculum = shuffled_epochs(10, 4, n_steps=7, seed=1)
    assert curriculum.batch_sizes.tolist() == [4, 4, 2, 4, 4, 2, 4]
    dropped = shuffled_epochs(10, 4, n_steps=5, seed=1, drop_last=True)
    assert dropped.batch_sizes.tolist() == [4, 4, 4, 4, 4]
    assert len(set(np.concatenate(dropped.batches()[:2]).tolist())) == 8


def test_shuffled_epochs_is_deterministic_per_seed_and_reshuffles():
    a = shuffled_epochs(50, 10, n_steps=10, seed=3)
    assert a == shuffled_epochs(50, 10, n_steps=10, seed=3)
    assert a != shuffled_epochs(50, 10, n_steps=10, seed=4)
    assert not np.array_equal(a.ids[:50], a.ids[50:])
    assert shuffled_epochs(50, 10, n_steps=10, seed=np.random.default_rng(3)) == a


def test_shuffled_epochs_over_given_pool_ids():
    curriculum = shuffled_epochs(20, 2, n_steps=4, seed=0, pool_ids=[3, 9, 11, 17])
    assert curriculum.n_pool == 20
    assert sorted(np.concatenate(curriculum.batches()[:2]).tolist()) == [3, 9, 11, 17]


def test_random_subset_uses_only_subset_each_epoch():
    curriculum = random_subset(100, 12, 4, n_steps=6, seed=0)
    first, second = curriculum.ids[:12], curriculum.ids[12:]
    assert len(set(first.tolist())) == 12
    assert sorted(first.tolist()) == sorted(second.tolist())


def test_random_curricula_are_reproducible_and_distinct():
    draws = random_curricula(4, 30, 5, n_steps=8, subset_size=20, seed=7)
    again = random_curricula(4, 30, 5, n_steps=8, subset_size=20, seed=7)
    assert draws == again
    assert len({tuple(c.ids.tolist()) for c in draws}) == 4
    assert all(c.n_steps == 8 and c.n_pool == 30 for c in draws)
    assert all(c.n_steps == 3 for c in random_curricula(2, 30, 5, n_steps=3, seed=0))


# ------------------------------------------------------------------ stack_csr


@given(st.lists(batch_lists, max_size=4))
@settings(max_examples=50)
def test_stack_csr_equals_vstack_of_padded_to_csr(all_batches):
    curricula = [Curriculum.from_batches(batches, n_pool=N_POOL) for batches in all_batches]
    n_steps_max = max((c.n_steps for c in curricula), default=0)
    counts, lengths = stack_csr(curricula, N_POOL)
    padded = [
        sp.vstack([c.to_csr(), sp.csr_matrix((n_steps_max - c.n_steps, N_POOL))]).toarray() for c in curricula
    ]
    expected = np.concatenate(padded) if padded else np.zeros((0, N_POOL))
    assert isinstance(counts, sp.csr_matrix)
    np.testing.assert_array_equal(counts.toarray(), expected)
    assert lengths.tolist() == [c.n_steps for c in curricula]


def test_stack_csr_pads_to_given_n_steps():
    curricula = [Curriculum.from_batches([[0, 0], [1]]), Curriculum.from_batches([[2]])]
    counts, lengths = stack_csr(curricula, 3, n_steps=4)
    assert counts.shape == (8, 3)
    assert counts[0, 0] == 2 and counts[1, 1] == 1 and counts[4, 2] == 1
    assert counts[5:8].nnz == 0 and counts[2:4].nnz == 0
    assert lengths.tolist() == [2, 1]


# ------------------------------------------------------------------ invalid input


@pytest.mark.parametrize(
    "offsets, ids, n_pool",
    [
        ([], [], None),  # no offsets at all
        ([1, 2], [0, 1], None),  # offsets[0] != 0
        ([0, 2, 1, 3], [0, 1, 2], None),  # decreasing
        ([0, 2], [0, 1, 2], None),  # offsets[-1] != len(ids)
        ([0, 2], [0, -1], None),  # negative id
        ([0, 2], [0, 5], 5),  # id >= n_pool
        ([0, 1], [0.5], None),  # non-integer id
        ([[0, 1]], [0], None),  # 2-D offsets
        ([0, 1], [0], -1),  # negative n_pool
    ],
)
def test_invalid_construction_raises(offsets, ids, n_pool):
    with pytest.raises(CurriculumError):
        Curriculum(offsets, ids, n_pool)


def test_error_messages_name_the_fault():
    with pytest.raises(CurriculumError, match="step 2"):
        Curriculum([0, 2, 1, 3], [0, 1, 2])
    with pytest.raises(CurriculumError, match="ids\\[1\\] = 7"):
        Curriculum([0, 2], [0, 7], n_pool=5)
    with pytest.raises(CurriculumError, match="step 3"):
        Curriculum.from_batches([[1], [2]]).batch(3)


def test_from_batches_rejects_bad_batches():
    with pytest.raises(CurriculumError, match="step 2"):
        Curriculum.from_batches([[1], 2])
    with pytest.raises(CurriculumError):
        Curriculum.from_batches([[1], [-3]])
    with pytest.raises(CurriculumError):
        Curriculum.from_batches([[1], [4]], n_pool=4)


@pytest.fixture
def small():
    return Curriculum.from_batches([[0, 1], [], [2, 1]], n_pool=4)


@pytest.mark.parametrize("step", [0, 4, -1, 1.0, True])
def test_bad_steps_raise(small, step):
    with pytest.raises(CurriculumError):
        small.batch(step)
    with pytest.raises(CurriculumError):
        small.duplicate(1, step=step)
    with pytest.raises(CurriculumError):
        small.move(1, to_step=step)
    with pytest.raises(CurriculumError):
        small.move(1, to_step=1, from_step=step)
    with pytest.raises(CurriculumError):
        small.swap_batches(1, step)


@pytest.mark.parametrize("example_id", [-1, 4, 2.0])
def test_bad_ids_raise(small, example_id):
    with pytest.raises(CurriculumError, match=str(example_id)):
        small.duplicate(example_id)
    with pytest.raises(CurriculumError):
        small.move(example_id, to_step=1)
    with pytest.raises(CurriculumError):
        small.replace(example_id, 0)
    with pytest.raises(CurriculumError):
        small.replace(0, example_id)
    with pytest.raises(CurriculumError):
        small.remove([0, example_id])
    with pytest.raises(CurriculumError):
        small.keep_only([example_id])


def test_move_of_absent_id_raises(small):
    with pytest.raises(CurriculumError, match="example_id 3"):
        small.move(3, to_step=1)
    with pytest.raises(CurriculumError, match="step 3"):
        small.move(0, to_step=1, from_step=3)


def test_bad_truncate_and_concat_raise(small):
    with pytest.raises(CurriculumError):
        small.truncate(4)
    with pytest.raises(CurriculumError):
        small.truncate(-1)
    with pytest.raises(CurriculumError):
        small.concat(Curriculum.from_batches([[0]], n_pool=5))
    with pytest.raises(CurriculumError):
        small.concat(Curriculum.from_batches([[7]]))


def test_to_csr_rejects_too_small_or_mismatched_pool(small):
    with pytest.raises(CurriculumError):
        small.to_csr(3)
    with pytest.raises(CurriculumError):
        Curriculum.from_batches([[0, 5]]).to_csr(5)
    with pytest.raises(CurriculumError):
        Curriculum.from_batches([[0, 5]]).counts(3)


def test_stack_csr_rejects_bad_input(small):
    with pytest.raises(CurriculumError, match="curricula\\[1\\]"):
        stack_csr([small, small.concat(small)], 4, n_steps=3)
    with pytest.raises(CurriculumError):
        stack_csr([Curriculum.from_batches([[9]])], 4)
    with pytest.raises(CurriculumError):
        stack_csr([small], 5)


def test_random_generators_reject_bad_options():
    with pytest.raises(CurriculumError):
        shuffled_epochs(10, 0, n_steps=3)
    with pytest.raises(CurriculumError):
        shuffled_epochs(10, 2, n_steps=-1)
    with pytest.raises(CurriculumError):
        shuffled_epochs(3, 4, n_steps=2, drop_last=True)
    with pytest.raises(CurriculumError):
        shuffled_epochs(0, 4, n_steps=2)
    with pytest.raises(CurriculumError):
        shuffled_epochs(10, 2, n_steps=3, pool_ids=[1, 10])
    with pytest.raises(CurriculumError):
        random_subset(10, 11, 2, n_steps=3)
    with pytest.raises(CurriculumError):
        random_subset(10, 0, 2, n_steps=3)


def test_offsets_whose_differences_would_wrap_around_are_refused():
    # np.diff of these int64 offsets overflows and looks non-decreasing; a comparison does not
    with pytest.raises(CurriculumError, match="non-decreasing"):
        Curriculum([0, 2**62 + 1, -(2**62), 3], [0, 0, 0])
