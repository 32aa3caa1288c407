"""The one method registry: building by name, option errors, and a model loader that trusts no file."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from simfluence._io import load_npz
from simfluence.attribution.unrolled_simulator import UnrolledSimulator
from simfluence.curriculum import Curriculum
from simfluence.errors import ModelFileError, SimfluenceError
from simfluence.methods import DEFAULT_METHOD, DEFAULT_METHODS, METHODS, load_simulator, make_simulator
from simfluence.simulators import SimfluenceLinear
from simfluence.simulators.fixed_effects import FixedEffectsSimulator
from simfluence.simulators.mean_curve import MeanCurve


def test_every_method_builds_and_its_class_kind_is_a_method():
    for name, entry in METHODS.items():
        sim = make_simulator(name)
        assert type(sim).kind in METHODS, name  # a saved model of any method can be loaded back
        assert entry.description and "\n" not in entry.description
        for key, value in entry.preset.items():
            assert sim.get_params()[key] == value
    assert set(DEFAULT_METHODS) <= set(METHODS) and DEFAULT_METHOD in METHODS
    assert {"task", "checkpoints"} <= METHODS["tracin"].needs and not METHODS["linear_mom"].needs


def test_every_simulator_takes_one_fit_protocol_and_declares_its_needs_in_tags():
    """fit(runset, runs=None, *, task=None) on every class; needs and per_base read from the class tags only."""
    import inspect

    from simfluence.simulators import fit_needs, is_per_base

    for name, entry in METHODS.items():
        cls = entry.simulator_class()
        parameters = inspect.signature(cls.fit).parameters
        assert list(parameters)[:3] == ["self", "runset", "runs"], name
        assert parameters["runs"].default is None, name
        assert parameters["task"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["task"].default is None, name
        assert entry.needs == fit_needs(cls) == cls.tags["needs"], name
        assert entry.per_base == is_per_base(cls) == (name in ("unrolled", "unrolled_anchored")), name
    assert METHODS["fixed_effects"].needs == {"scores"} and METHODS["blend_influence"].needs == {"task", "checkpoints"}


def test_a_method_that_needs_no_task_accepts_and_ignores_one(small_runset):
    plain = make_simulator("linear_mom").fit(small_runset, runs=range(4))
    given = make_simulator("linear_mom").fit(small_runset, runs=range(4), task="unused.py:task")
    assert np.array_equal(plain.A_, given.A_) and np.array_equal(plain.B_, given.B_)
    assert np.array_equal(MeanCurve().fit(small_runset, task=object()).mean_change_,
                          MeanCurve().fit(small_runset).mean_change_)


def test_presets_can_be_overridden_but_unknown_options_cannot_be_given():
    assert make_simulator("linear_mom", momentum=0.5).momentum == 0.5
    with pytest.raises(SimfluenceError, match=r"method 'linear' has no option 'hessian' \(its options: lam, "):
        make_simulator("linear", hessian="exact")
    with pytest.raises(SimfluenceError, match="unknown method 'nope'; choose from mean_curve"):
        make_simulator("nope")


@pytest.fixture
def saved(tmp_path, small_runset):
    return SimfluenceLinear(lam=1.0).fit(small_runset).save(tmp_path / "model.npz")


@pytest.mark.parametrize(
    "edit_meta, edit_arrays, message",
    [
        (lambda m: m["params"].update(bogus=1), None, "has no parameter 'bogus'"),
        (lambda m: m.update(state=[1, 2]), None, "must be JSON objects"),
        (lambda m: m["state"].update(check_fitted=1), None, "state key 'check_fitted' is not a fitted attribute"),
        (lambda m: m["state"].update(__class___=1), None, "is not a fitted attribute"),
        (lambda m: m["state"].update(A_=[1]), None, "unexpected state 'A_'"),
        (lambda m: m.update(kind="os.system"), None, "unknown simulator kind 'os.system'"),
        (lambda m: m["params"].update(lam="x"), None, None),  # a bad value loads, and fails clearly when used
        (None, lambda a: a.pop("B_"), "missing arrays ['B_']"),
        (None, lambda a: a.update(extra=np.zeros(2)), "unexpected arrays ['extra']"),
        (lambda m: m.update(version=99), None, "version 99 is not supported"),
    ],
)
def test_a_tampered_model_file_is_one_clear_error(saved, edit_meta, edit_arrays, message, rewrite_model):
    path = rewrite_model(saved, edit_meta, edit_arrays)
    if message is None:
        sim = load_simulator(path)
        assert sim.lam == "x"
        return
    with pytest.raises(ModelFileError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_simulator(path)


def test_a_model_file_is_the_same_bytes_when_fitted_twice(tmp_path, small_runset):
    first = SimfluenceLinear(lam=1.0).fit(small_runset).save(tmp_path / "a.npz")
    second = SimfluenceLinear(lam=1.0).fit(small_runset).save(tmp_path / "b.npz")
    meta_a, meta_b = load_npz(first)[1], load_npz(second)[1]
    assert json.dumps(meta_a) == json.dumps(meta_b)  # no wall-clock fields in the file


# ----------------------------------------------------------------------------- shapes and sizes checked before use
@pytest.fixture
def fixed_model(tmp_path, small_runset):
    """A fixed-effects model with two checkpoints' scores (10 pool, 3 test examples) saved to a file."""
    scores = np.random.default_rng(0).normal(size=(2, 10, 3))
    sim = FixedEffectsSimulator(weighting="batch_mean", offset="mean_curve").set_scores(scores, [0, 4])
    return sim.fit(small_runset).save(tmp_path / "fixed.npz")


def drop_ids_and(key, value):
    """An edit of the metadata: no ``pool_ids_`` (as files written before ids were saved) and ``state[key] = value``."""
    def edit(meta):
        meta["state"].pop("pool_ids_")
        meta["state"][key] = value
    return edit


def state(key, value):
    return lambda meta: meta["state"].update({key: value})


@pytest.mark.parametrize(
    "edit_meta, edit_arrays, message",
    [
        (drop_ids_and("n_pool_", "x"), None, "state 'n_pool_' must be an int >= 1, got 'x'"),
        (drop_ids_and("n_pool_", 1e30), None, "state 'n_pool_' must be an int >= 1, got 1e+30"),
        (drop_ids_and("n_pool_", None), None, "state 'n_pool_' must be an int >= 1, got None"),
        (drop_ids_and("n_pool_", 10**400), None, "state 'n_pool_' must be an int >= 1, got 100000000000000000000..."),
        (drop_ids_and("n_pool_", 30_000_000), None, "expected (n_checkpoints, n_pool_, n_test_) = (2, 30000000, 3)"),
        (state("test_ids_", None), None, "state 'test_ids_' must be a list of n_test_ = 3 ids, got NoneType"),
        (state("test_ids_", ["a", "b"]), None, "state 'test_ids_' must be a list of n_test_ = 3 ids, got 2 ids"),
        (state("pool_ids_", [[1]] * 10), None, "state 'pool_ids_' holds [1]: ids are ints or strings"),
        (state("train_runs_", None), None, "state 'train_runs_' must be a list of run names"),
        (None, lambda a: a.update(checkpoint_steps_=np.array([4])), "array 'checkpoint_steps_' has shape (1,), "
                                                                    "expected (n_checkpoints,) = (2,)"),
        (None, lambda a: a.update(scores_=a["scores_"][:, :, :2]), "array 'scores_' has shape (2, 10, 2)"),
        (None, lambda a: a.update(scores_=a["scores_"][0]), "array 'scores_' has shape (10, 3)"),
        (None, lambda a: a.update(checkpoint_steps_=np.array([4, 0])), "checkpoint_steps_ [4, 0] are not increasing"),
        (None, lambda a: a.update(checkpoint_steps_=np.array([0.0, 4.0])), "array 'checkpoint_steps_' has dtype "
                                                                           "float64, expected int"),
        (None, lambda a: a.update(scale_=np.array(["a", "b", "c"])), "array 'scale_' has dtype <U1, expected float"),
        (None, lambda a: a.update(offset_=a["offset_"][:-2]), "array 'offset_' has shape (7, 3), expected "
                                                              "(n_steps+1, n_test_) = (9, 3)"),
        (state("loss_floor_", "x"), None, "state 'loss_floor_' must be a number or null, got 'x'"),
    ],
)
def test_a_model_file_whose_sizes_or_shapes_disagree_is_one_error_naming_the_field(fixed_model, rewrite_model,
                                                                                 edit_meta, edit_arrays, message):
    path = rewrite_model(fixed_model, edit_meta, edit_arrays)
    with pytest.raises(ModelFileError) as caught:
        load_simulator(path)
    assert str(caught.value).startswith(f"{str(path)!r}: ") and "\n" not in str(caught.value)
    assert message in str(caught.value)


def test_a_huge_declared_pool_is_refused_before_any_allocation(fixed_model, rewrite_model):
    import tracemalloc

    path = rewrite_model(fixed_model, drop_ids_and("n_pool_", 30_000_000))
    tracemalloc.start()
    with pytest.raises(ModelFileError, match="n_pool_"):
        load_simulator(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_file_without_ids_gets_positions_when_its_arrays_confirm_the_sizes(fixed_model, rewrite_model):
    def drop(meta):
        del meta["state"]["pool_ids_"], meta["state"]["test_ids_"]
    sim = load_simulator(rewrite_model(fixed_model, drop))
    assert sim.pool_ids_ == list(range(10)) and sim.test_ids_ == [0, 1, 2]


def test_without_ids_a_size_no_array_confirms_is_refused(tmp_path, small_runset, rewrite_model):
    path = MeanCurve().fit(small_runset).save(tmp_path / "mean.npz")
    rewrite_model(path, drop_ids_and("n_pool_", 30_000_000))
    with pytest.raises(ModelFileError, match="state 'pool_ids_' is missing and no array confirms n_pool_ = 30000000"):
        load_simulator(path)


def test_a_short_step_term_array_of_the_linear_family_is_refused(tmp_path, small_runset, rewrite_model):
    path = SimfluenceLinear(lam=1.0, step_terms=True).fit(small_runset).save(tmp_path / "linear.npz")
    rewrite_model(path, None, lambda arrays: arrays.update(step_alpha_=arrays["step_alpha_"][:2]))
    with pytest.raises(ModelFileError, match=r"array 'step_alpha_' has shape \(2, 3\), expected \(n_step_terms_"):
        load_simulator(path)


def test_every_saved_array_of_every_method_has_a_declared_shape():
    for name, entry in METHODS.items():
        cls = entry.simulator_class()
        saved = {*cls._fitted_arrays, *getattr(cls, "_optional_arrays", ())}
        assert saved == set(cls._array_specs), name


def handmade_unrolled() -> UnrolledSimulator:
    """An unrolled simulator built from consistent arrays (no replay): 3 steps, pool of 4, 2 test examples."""
    rng = np.random.default_rng(0)
    sim = UnrolledSimulator(insertion_steps=[1, 3])
    sim.base_offsets_, sim.base_ids_ = np.array([0, 2, 3, 5]), np.array([0, 1, 2, 0, 3])
    sim.base_losses_, sim.target_steps_ = rng.uniform(1, 2, size=(4, 2)), np.array([1, 3])
    sim.occurrence_effects_ = rng.normal(size=(5, 2, 2))
    sim.insertion_steps_ = np.array([1, 3])
    sim.insertion_effects_ = rng.normal(size=(2, 4, 2, 2)).astype(np.float32)
    sim.n_pool_, sim.n_test_, sim.pool_ids_, sim.test_ids_ = 4, 2, [10, 11, 12, 13], ["a", "b"]
    sim.train_runs_, sim.base_run_, sim.optimizer_ = ["run-0"], "run-0", {"class": "SGD"}
    sim.init_seed_, sim.seed_, sim.replay_error_, sim.fitted_ = 0, 0, 0.0, True
    return sim


@pytest.mark.parametrize(
    "edit_arrays, message",
    [
        (lambda a: a.update(insertion_steps_=np.array([1, 9])), "insertion_steps_ must be increasing steps in 1..3"),
        (lambda a: a.update(insertion_steps_=np.array([1])), "array 'insertion_effects_' has shape (2, 4, 2, 2), "
                                                             "expected (n_insertions, n_pool_, n_targets, n_test_) = "
                                                             "(1, 4, 2, 2)"),
        (lambda a: a.update(insertion_effects_=a["insertion_effects_"][:, :3]), "array 'insertion_effects_' has "
                                                                                "shape (2, 3, 2, 2)"),
        (lambda a: a.update(target_steps_=np.array([1, 2])), "target_steps_ must be increasing steps in 1..3 ending "
                                                             "at 3"),
        (lambda a: a.update(base_ids_=np.array([0, 1, 2, 0, 7])), "base_offsets_, base_ids_: ids[4] = 7"),
        (lambda a: a.update(base_losses_=a["base_losses_"][:3]), "array 'base_losses_' has shape (3, 2)"),
        (lambda a: a.update(occurrence_effects_=a["occurrence_effects_"][:4]), "array 'occurrence_effects_'"),
    ],
)
def test_a_tampered_unrolled_model_file_is_one_clear_error(tmp_path, rewrite_model, edit_arrays, message):
    path = handmade_unrolled().save(tmp_path / "unrolled.npz")
    whatif = Curriculum.from_batches([[0, 1, 3], [2], [0, 3, 3]], n_pool=4)
    assert load_simulator(path).simulate(whatif, np.ones(2)).shape == (1, 4, 2)  # the untampered file works
    rewrite_model(path, None, edit_arrays)
    with pytest.raises(ModelFileError, match=re.escape(message)):
        load_simulator(path)


def test_a_zip_bomb_model_file_is_refused_before_it_is_inflated(fixed_model):
    import tracemalloc
    import zipfile

    with zipfile.ZipFile(fixed_model, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (64 * 2**20,)})
            zeros = bytes(2**20)
            for _ in range(64):
                member.write(zeros)
    assert fixed_model.stat().st_size < 2**20
    tracemalloc.start()
    with pytest.raises(ModelFileError, match="its arrays would inflate to 671"):
        load_simulator(fixed_model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20


def test_an_array_header_declaring_more_data_than_its_member_holds_is_refused(fixed_model):
    import zipfile

    with zipfile.ZipFile(fixed_model, "a") as archive:
        with archive.open("huge.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
            member.write(bytes(16))
    with pytest.raises(ModelFileError, match="array 'huge.npy' declares 8000000000 bytes of data, its member holds 16"):
        load_simulator(fixed_model)


# ----------------------------------------------------------------------------- fuzzing the model loader
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=8))
_json = st.recursive(_scalars,
                     lambda children: st.lists(children, max_size=3)
                     | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
_FIELDS = ("format", "version", "kind", "params", "state")
_KEYS = ("n_pool_", "n_test_", "pool_ids_", "test_ids_", "train_runs_", "n_step_terms_", "lr_reference_", "lam_",
         "momentum_", "loss_floor_", "validation_", "lam", "multiplicative", "alpha_center", "step_terms",
         "lr_scaled", "batch_mean", "momentum", "clip_negative", "solver", "tol", "max_iter")


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(_FIELDS + ("params.*", "state.*", "bytes")), value=_json,
       key=st.sampled_from(_KEYS) | st.text(max_size=12),
       offset=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=16))
def test_a_mutated_model_file_loads_or_is_a_model_file_error(tmp_path, small_runset, rewrite_model, field, value,
                                                             key, offset, junk):
    path = SimfluenceLinear(lam=1.0, step_terms=True).fit(small_runset).save(tmp_path / "fuzz.npz")
    if field == "bytes":
        data = bytearray(path.read_bytes())
        data[offset % len(data): offset % len(data) + len(junk)] = junk
        path.write_bytes(bytes(data))
    else:
        def edit(meta):
            if field.endswith(".*"):
                meta[field[:-2]][key] = value
            else:
                meta[field] = value
        rewrite_model(path, edit)
    try:
        sim = load_simulator(path)
    except ModelFileError:
        return
    run = small_runset[0]
    try:
        sim.simulate(run.curriculum, run.initial_losses)  # a file that loads is usable, or fails with our error
    except SimfluenceError:
        pass


# the paper's forms are kept as they were published (unclipped) as named baselines; every other learned
# method never simulates a negative loss when the logged losses are non-negative
UNCLIPPED_BASELINES = {"linear", "linear_res", "additive"}


@pytest.mark.parametrize("name", [name for name, entry in METHODS.items()
                                  if not entry.needs and name not in UNCLIPPED_BASELINES])
def test_learned_methods_never_simulate_a_negative_loss(name):
    from pathlib import Path

    from simfluence.curriculum import random_curricula
    from simfluence.runlog import RunSet

    runset = RunSet.load(Path(__file__).resolve().parent.parent / "runs" / "digits-mini")
    sim = make_simulator(name)
    if sim.tags.get("per_base"):
        pytest.skip("fitted around one base run")
    sim.fit(runset, list(range(len(runset) - 2)))
    # curricula unlike any logged run: a quarter of the pool over and over, so some examples repeat many times
    curricula = random_curricula(30, runset.n_pool, 8, runset[0].n_steps, subset_size=runset.n_pool // 4,
                                 seed=np.random.default_rng(0))
    trajectories = sim.simulate(curricula, runset[-1].initial_losses)
    assert np.isfinite(trajectories).all() and trajectories.min() >= 0.0
    paper = make_simulator("linear").fit(runset, list(range(len(runset) - 2)))
    assert paper.simulate(curricula, runset[-1].initial_losses).min() < 0  # the check can fail: the baseline does
