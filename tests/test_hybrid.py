"""The effect-level hybrid (linear_mom_prior): its fit against a dense solve, recovery, and the family's protocol."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.attribution.hybrid import LinearPrior, nearest_checkpoint
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import SimfluenceError
from simfluence.methods import load_simulator, make_simulator
from simfluence.runlog import Run, RunSet
from simfluence.synthetic import known_linear_runset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def prior_runset(scales, n_pool=40, n_test=4, n_runs=4, n_steps=20, noise=0.002, seed=0):
    """Additive runs whose true effects are ``scales[z] * prior + noise`` (a known prior with known scales)."""
    rng = np.random.default_rng(seed)
    prior = rng.normal(scale=0.02, size=(n_pool, n_test))
    truth = prior * np.asarray(scales)[None, :] + rng.normal(scale=noise, size=(n_pool, n_test))
    curricula = random_curricula(n_runs, n_pool, 4, n_steps, subset_size=n_pool // 2, seed=rng)
    initial = rng.uniform(1.0, 2.0, size=n_test)
    runs = []
    for index, cur in enumerate(curricula):
        losses = initial + np.concatenate([np.zeros((1, n_test)), np.cumsum(cur.to_csr(n_pool) @ truth, axis=0)])
        runs.append(Run(f"run-{index}", cur, np.arange(n_steps + 1), losses))
    return RunSet(runs, n_pool=n_pool), prior, truth


def dense_hybrid_fit(runset, runs, prior, prior_steps, lam, momentum, shared_scale, delta_ratio=1.0, scale_lam=0.0,
                     center=0.0, mult_ratio=1.0):
    """The hybrid's objective solved by brute force: every test's dense design built step by step from the curricula
    (alpha_center 1, step terms, plain counts), the prior's phase columns appended with no penalty (or
    ``scale_lam * |column|^2 (s - center)^2``), one dense solve (all tests in one system when the scales are shared);
    the additive pool effects' penalty is ``lam * delta_ratio``, the multiplicative ones' ``lam * mult_ratio``."""
    n_pool, n_test = runset.n_pool, runset.n_test
    horizon = max(runset[i].n_steps for i in runs)
    n_phases = len(prior_steps)
    rows, prevs, targets = [], [], []
    for i in runs:
        run = runset[i]
        counts = run.curriculum.to_csr(n_pool).toarray()
        for t in range(1, run.n_steps + 1):
            onehot = np.zeros(horizon)
            onehot[t - 1] = 1.0
            previous_change = run.losses[t - 1] - run.losses[t - 2] if t >= 2 else np.zeros(n_test)
            phase = int(np.argmin(np.abs(np.asarray(prior_steps) - (t - 1))))  # nearest to t - 1, ties earlier
            rows.append((np.concatenate([counts[t - 1], onehot]), phase, counts[t - 1]))
            prevs.append(run.losses[t - 1])
            targets.append(run.losses[t] - run.losses[t - 1] - momentum * previous_change)
    features = np.array([row[0] for row in rows])
    prevs, targets = np.array(prevs), np.array(targets)
    n_params = 2 * features.shape[1]
    theta_penalty = np.full(n_params, lam)
    theta_penalty[features.shape[1]:features.shape[1] + n_pool] *= delta_ratio  # the rows of delta
    theta_penalty[:n_pool] *= mult_ratio  # the rows of A
    blocks, columns = [], []
    for z in range(n_test):
        blocks.append(np.hstack([prevs[:, z:z + 1] * features, features]))
        column = np.zeros((len(rows), n_phases))
        for j, (_, phase, count) in enumerate(rows):
            column[j, phase] = count @ prior[phase, :, z]
        columns.append(column)
    if shared_scale:
        design = np.zeros((len(rows) * n_test, n_params * n_test + n_phases))
        for z in range(n_test):
            design[z * len(rows):(z + 1) * len(rows), z * n_params:(z + 1) * n_params] = blocks[z]
            design[z * len(rows):(z + 1) * len(rows), n_params * n_test:] = columns[z]
        weight = scale_lam * sum((column ** 2).sum(axis=0) for column in columns)
        penalty = np.concatenate([np.tile(theta_penalty, n_test), weight])
        rhs = design.T @ targets.T.ravel() + np.concatenate([np.zeros(n_params * n_test), weight * center])
        solution = np.linalg.solve(design.T @ design + np.diag(penalty), rhs)
        thetas = solution[:n_params * n_test].reshape(n_test, n_params).T
        return thetas, np.repeat(solution[n_params * n_test:, None], n_test, axis=1)
    thetas, scales = [], []
    for z in range(n_test):
        design = np.hstack([blocks[z], columns[z]])
        weight = scale_lam * (columns[z] ** 2).sum(axis=0)
        penalty = np.concatenate([theta_penalty, weight])
        rhs = design.T @ targets[:, z] + np.concatenate([np.zeros(n_params), weight * center])
        solution = np.linalg.solve(design.T @ design + np.diag(penalty), rhs)
        thetas.append(solution[:n_params])
        scales.append(solution[n_params:])
    return np.array(thetas).T, np.array(scales).T


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("prior_scale", ["per_test", "global"])
def test_the_fit_equals_a_dense_solve_with_unpenalised_prior_scales(solver, prior_scale):
    runset, _, _ = known_linear_runset(n_pool=6, n_test=3, n_runs=3, n_steps=6, batch_size=2, noise=0.01, seed=2)
    rng = np.random.default_rng(1)
    prior, steps = rng.normal(scale=0.05, size=(2, 6, 3)), [0, 3]
    sim = LinearPrior(lam=0.3, momentum=0.4, alpha_center=1.0, step_terms=True, solver=solver, precision="float64",
                      tol=1e-12, prior_scale=prior_scale).set_prior(prior, steps).fit(runset)
    theta, scales = dense_hybrid_fit(runset, range(3), prior, steps, 0.3, 0.4, prior_scale == "global")
    n_features = 6 + 6
    assert np.allclose(sim.A_, theta[:6], atol=1e-8) and np.allclose(sim.step_alpha_, theta[6:n_features], atol=1e-8)
    assert np.allclose(sim.B_, theta[n_features:n_features + 6], atol=1e-8)
    assert np.allclose(sim.step_beta_, theta[n_features + 6:], atol=1e-8)
    assert np.allclose(sim.prior_scale_, scales, atol=1e-7)
    assert np.allclose(sim.effects(step=5), sim.B_ + sim.prior_scale_[1] * prior[1])  # step 5 starts at 4: phase 1


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("prior_scale", ["per_test", "global"])
def test_the_penalties_on_delta_and_on_the_scales_equal_a_dense_solve(solver, prior_scale):
    runset, _, _ = known_linear_runset(n_pool=6, n_test=3, n_runs=3, n_steps=6, batch_size=2, noise=0.01, seed=2)
    prior, steps = np.random.default_rng(1).normal(scale=0.05, size=(2, 6, 3)), [0, 3]
    options = {"delta_lam_ratio": 5.0, "mult_lam_ratio": 3.0, "scale_lam": 0.5, "scale_center": 0.7}
    sim = LinearPrior(lam=0.3, momentum=0.4, alpha_center=1.0, step_terms=True, solver=solver, precision="float64",
                      tol=1e-12, prior_scale=prior_scale, **options).set_prior(prior, steps).fit(runset)
    theta, scales = dense_hybrid_fit(runset, range(3), prior, steps, 0.3, 0.4, prior_scale == "global",
                                     delta_ratio=5.0, scale_lam=0.5, center=0.7, mult_ratio=3.0)
    assert np.allclose(sim.A_, theta[:6], atol=1e-8) and np.allclose(sim.B_, theta[12:18], atol=1e-8)
    assert np.allclose(sim.prior_scale_, scales, atol=1e-7)
    free = dense_hybrid_fit(runset, range(3), prior, steps, 0.3, 0.4, prior_scale == "global", delta_ratio=5.0,
                            mult_ratio=3.0)[1]
    assert np.abs(scales - 0.7).max() < np.abs(free - 0.7).max()  # the penalty pulls the scales to the centre
    strong = LinearPrior(lam=0.3, momentum=0.4, alpha_center=1.0, step_terms=True, precision="float64",
                         prior_scale=prior_scale, scale_lam=1e9).set_prior(prior, steps).fit(runset)
    assert np.allclose(strong.prior_scale_, 1.0, atol=1e-6)  # the default centre: s = 1, first-order theory


def test_the_momentum_search_with_penalised_scales_matches_fixed_momentum_fits(small_runset):
    """The search solves once for every momentum (the fit is linear in the previous change); with a centre on the
    scales the fit is affine in the first-order target only, so each candidate must equal a fit at its momentum."""
    from simfluence.simulators.linear import validation_mse

    prior = np.random.default_rng(0).normal(scale=0.05, size=(2, 10, 3))
    options = {"lam": 1.0, "scale_lam": 0.3, "scale_center": 2.0, "precision": "float64", "tol": 1e-12}
    searched = make_simulator("linear_mom_prior", momentum_grid=(0.0, 0.6), **options).set_prior(prior, [0, 4])
    searched.fit(small_runset, runs=range(4))
    for entry in searched.validation_:
        fixed = make_simulator("linear_mom_prior", momentum=entry["momentum"], **options).set_prior(prior, [0, 4])
        fixed.fit(small_runset, runs=range(3))  # the search fits on the first 3 of 4 runs, validates on the last
        assert np.isclose(entry["mse"], validation_mse(fixed, small_runset, [3]), rtol=1e-6), entry


def test_a_prior_of_zeros_reproduces_linear_mom_exactly(small_runset):
    plain = make_simulator("linear_mom").fit(small_runset, runs=range(4))
    hybrid = make_simulator("linear_mom_prior").set_prior(np.zeros((10, 3))).fit(small_runset, runs=range(4))
    assert (hybrid.lam_, hybrid.momentum_, hybrid.validation_) == (plain.lam_, plain.momentum_, plain.validation_)
    for name in ("A_", "B_", "step_alpha_", "step_beta_"):
        assert np.array_equal(getattr(hybrid, name), getattr(plain, name)), name
    assert not hybrid.prior_scale_.any()
    run = small_runset[0]
    assert np.array_equal(hybrid.simulate(run.curriculum, run.initial_losses),
                          plain.simulate(run.curriculum, run.initial_losses))
    none = make_simulator("linear_mom_prior", prior="none").fit(small_runset, runs=range(4))  # no task needed
    assert np.array_equal(none.B_, plain.B_)


@pytest.mark.filterwarnings("ignore::simfluence.errors.FitWarning")  # noiseless losses: the weakest lam wins
def test_with_few_runs_the_prior_recovers_effects_that_linear_mom_cannot():
    scales = [0.5, 1.0, 2.0, -1.0]  # a negative one: the sign of the prior is fitted too
    runset, prior, truth = prior_runset(scales, n_pool=80, n_runs=3, n_steps=15)  # 45 steps for 80 effects a test
    options = {"multiplicative": False}  # additive truth: the effects B are identifiable
    plain = make_simulator("linear_mom", **options).fit(runset)
    hybrid = make_simulator("linear_mom_prior", **options).set_prior(prior).fit(runset)
    plain_error = np.linalg.norm(plain.B_ - truth) / np.linalg.norm(truth)
    hybrid_error = np.linalg.norm(hybrid.effects() - truth) / np.linalg.norm(truth)
    assert hybrid_error < 0.15 and plain_error > 0.5, (hybrid_error, plain_error)  # measured 0.07 and 0.72
    assert np.allclose(hybrid.prior_scale_[0], scales, rtol=0.1)


def test_phase_scales_are_fitted_per_phase():
    """Runs whose effects follow prior_0 for steps 1-10 and prior_1 afterwards, with different scales."""
    rng = np.random.default_rng(3)
    n_pool, n_test, n_steps = 30, 3, 20
    prior = rng.normal(scale=0.02, size=(2, n_pool, n_test))
    true_scales = np.array([[1.0, 2.0, 0.5], [3.0, -1.0, 1.0]])
    truth = LinearPrior(multiplicative=False, alpha_center=1.0).set_prior(prior, [0, 20])
    truth.A_, truth.B_ = np.zeros((n_pool, n_test)), np.zeros((n_pool, n_test))
    truth.prior_, truth.prior_steps_, truth.prior_scale_ = prior, np.array([0, 20]), true_scales
    truth.n_step_terms_, truth.momentum_, truth.lr_reference_, truth.loss_floor_ = 0, 0.0, None, None
    truth.fitted_ = True
    curricula = random_curricula(6, n_pool, 3, n_steps, seed=4)
    losses = truth.simulate(curricula, np.full(n_test, 2.0))
    runset = RunSet([Run(f"run-{r}", curricula[r], np.arange(n_steps + 1), losses[r]) for r in range(6)], n_pool=n_pool)
    sim = LinearPrior(multiplicative=False, alpha_center=1.0, lam=1.0).set_prior(prior, [0, 20]).fit(runset)
    assert np.allclose(sim.prior_scale_, true_scales, atol=1e-6)
    assert np.allclose(sim.B_, 0.0, atol=1e-6)  # nothing left for the learned part


def test_nearest_checkpoint_uses_the_weights_a_step_starts_from():
    # step t starts from the weights after step t - 1; step 6 starts at 5, midway between 3 and 7: the earlier
    assert nearest_checkpoint(np.arange(1, 9), np.array([0, 3, 7])).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("options", [{}, {"scale_lam": 0.5, "delta_lam_ratio": 3.0, "mult_lam_ratio": 2.0}])
def test_leave_one_out_is_exact_with_one_table_per_phase(small_runset, options):
    prior = np.random.default_rng(0).normal(scale=0.05, size=(2, 10, 3))
    sim = make_simulator("linear_mom_prior", momentum=0.5, **options).set_prior(prior, [0, 4])
    sim.fit(small_runset, runs=range(3))
    assert sim.prior_scale_.shape == (2, 3) and np.abs(sim.prior_scale_).max() > 0
    run = small_runset[3]
    effects = sim.leave_one_out(run.curriculum, run.initial_losses)
    base = sim.simulate(run.curriculum, run.initial_losses, clip=False)[0, -1]
    for example in np.unique(run.curriculum.ids)[:4]:
        batches = [[i for i in batch if i != example] for batch in run.curriculum.batches()]
        edited = Curriculum.from_batches(batches, n_pool=10)
        expected = sim.simulate(edited, run.initial_losses, clip=False)[0, -1] - base
        assert np.allclose(effects[example], expected, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"scale_lam": 0.5, "scale_center": 2.0, "delta_lam_ratio": 3.0,
                                      "mult_lam_ratio": 2.0}])
def test_a_saved_hybrid_loads_back_without_pickle_and_simulates_the_same(tmp_path, small_runset, options):
    prior = np.random.default_rng(0).normal(scale=0.05, size=(2, 10, 3))
    sim = make_simulator("linear_mom_prior", **options).set_prior(prior, [0, 4]).fit(small_runset, runs=range(4))
    loaded = load_simulator(sim.save(tmp_path / "hybrid.npz"))
    assert type(loaded) is LinearPrior and loaded.get_params() == sim.get_params()
    run = small_runset[0]
    assert np.array_equal(loaded.simulate(run.curriculum, run.initial_losses),
                          sim.simulate(run.curriculum, run.initial_losses))
    assert np.array_equal(loaded.prior_scale_, sim.prior_scale_)


def test_bad_options_and_priors_are_one_error_naming_them(small_runset):
    with pytest.raises(SimfluenceError, match="prior_scale must be one of per_test, global"):
        LinearPrior(prior_scale="each").set_prior(np.zeros((10, 3))).fit(small_runset)
    with pytest.raises(SimfluenceError, match="the prior is for 9 pool / 3 test examples"):
        LinearPrior().set_prior(np.zeros((9, 3))).fit(small_runset)
    with pytest.raises(SimfluenceError, match="need 2 increasing checkpoint steps"):
        LinearPrior().set_prior(np.zeros((2, 10, 3)), [3, 3])
    for name, value in (("delta_lam_ratio", -1.0), ("mult_lam_ratio", np.inf), ("scale_lam", "1"),
                        ("scale_center", np.nan)):
        with pytest.raises(SimfluenceError, match=f"LinearPrior: {name} must be a finite number"):
            LinearPrior(**{name: value}).set_prior(np.zeros((10, 3))).fit(small_runset)


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """3 digits runs of 8 steps over a pool of 20, checkpoints at steps 0, 4 and 8."""
    from simfluence.workloads import generate_digits

    out = tmp_path_factory.mktemp("digits") / "ckpt"
    return generate_digits(out, n_runs=3, n_steps=8, batch_size=4, pool_size=20, test_size=6,
                           checkpoint_steps=(0, 4, 8), workers=1, progress=False)


def test_the_gradient_prior_is_tracin_per_checkpoint_in_effect_units(tiny_digits):
    from simfluence.attribution.simulators import TracInSimulator

    sim = make_simulator("linear_mom_prior").fit(tiny_digits, runs=range(2))
    scores, steps = TracInSimulator().compute_scores(tiny_digits, 0)
    assert sim.prior_steps_.tolist() == steps == [0, 4, 8] and sim.checkpoint_run_names_ == [tiny_digits[0].name]
    batch = np.mean([tiny_digits[i].curriculum.batch_sizes.mean() for i in range(2)])
    assert np.allclose(sim.prior_, -sim.lr_reference_ / batch * scores)  # s = 1: a plain SGD step on the batch
    assert np.isfinite(sim.prior_scale_).all() and sim.prior_scale_.shape == (3, 6)


def test_the_influence_prior_is_the_influence_method_at_the_final_checkpoint_in_effect_units(tiny_digits):
    from simfluence.attribution.simulators import InfluenceSimulator

    sim = make_simulator("linear_mom_prior", prior="influence", lam=1.0, momentum=0.0).fit(tiny_digits, runs=range(2))
    scores, steps = InfluenceSimulator().compute_scores(tiny_digits, 0)
    assert sim.prior_steps_.tolist() == steps == [8] and scores.shape == (1, 20, 6)
    batch = np.mean([tiny_digits[i].curriculum.batch_sizes.mean() for i in range(2)])
    assert np.allclose(sim.prior_, -sim.lr_reference_ / batch * scores)  # FixedEffectsSimulator's effect at s = 1
    assert sim.prior_scale_.shape == (1, 6) and np.isfinite(sim.prior_scale_).all()


def test_a_single_phase_pools_the_priors_weighted_by_the_steps_they_cover(small_runset):
    prior = np.random.default_rng(0).normal(size=(2, 10, 3))
    sim = make_simulator("linear_mom_prior", prior_phases="single").set_prior(prior, [0, 4]).fit(small_runset)
    # no learning rates logged: steps 1-3 start nearest checkpoint 0, steps 4-8 nearest checkpoint 4
    assert np.allclose(sim.prior_[0], (3 * prior[0] + 5 * prior[1]) / 8) and sim.prior_scale_.shape == (1, 3)


def test_intervals_and_sharded_fits_are_refused_with_one_error_each(small_runset):
    from simfluence.sharding import fit_sharded
    from simfluence.uncertainty import Bootstrap

    with pytest.raises(SimfluenceError, match="'linear_mom_prior' needs checkpoints, task to fit"):
        Bootstrap(make_simulator("linear_mom_prior"), n_resamples=2).fit(small_runset)
    with pytest.raises(SimfluenceError, match="LinearPrior cannot be fitted in test blocks"):
        fit_sharded(make_simulator("linear_mom_prior"), small_runset, n_blocks=2)
