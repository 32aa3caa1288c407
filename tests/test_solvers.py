"""Batched ridge solvers agree with a brute-force per-test-example solve."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from simfluence.errors import SimfluenceError
from simfluence.solvers import ConvergenceWarning, pair_products, solve_ridge


def _problem(seed=0, n_trans=120, n_features=15, n_test=4, density=0.25):
    rng = np.random.default_rng(seed)
    features = sp.random(n_trans, n_features, density=density, random_state=rng, format="csr")
    features.data = np.round(features.data * 3) + 1  # counts-like values
    prev = rng.uniform(0.5, 2.5, size=(n_trans, n_test))
    target = rng.normal(size=(n_trans, n_test))
    return features, prev, target


def _brute_force(features, prev, target, penalty, multiplicative):
    dense = features.toarray()
    thetas = []
    for m in range(target.shape[1]):  # the reference loop the library must avoid
        design = np.hstack([prev[:, [m]] * dense, dense]) if multiplicative else dense
        gram = design.T @ design + np.diag(penalty)
        thetas.append(np.linalg.solve(gram, design.T @ target[:, m]))
    return np.stack(thetas, axis=1)


@pytest.mark.parametrize("multiplicative", [True, False])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_solvers_equal_brute_force(multiplicative, solver):
    features, prev, target = _problem()
    size = 2 * features.shape[1] if multiplicative else features.shape[1]
    penalty = np.random.default_rng(1).uniform(0.01, 1.0, size=size)
    theta, info = solve_ridge(features, prev, target, penalty, multiplicative, solver=solver, tol=1e-13)
    expected = _brute_force(features, prev, target, penalty, multiplicative)
    assert info.solver == solver
    np.testing.assert_allclose(theta, expected, rtol=1e-8, atol=1e-10)


def test_pair_products_give_weighted_gram():
    features, prev, _ = _problem(n_features=9)
    keys, products = pair_products(features)
    flat = np.asarray(products @ prev)
    n = features.shape[1]
    for m in range(prev.shape[1]):
        gram = np.zeros(n * n)
        gram[keys] = flat[:, m]
        expected = features.T @ sp.diags(prev[:, m]) @ features
        np.testing.assert_allclose(gram.reshape(n, n), expected.toarray(), rtol=1e-12)


def test_cg_warm_start_converges_immediately():
    features, prev, target = _problem()
    penalty = np.full(30, 0.1)
    theta, _ = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12)
    _, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-10, x0=theta)
    assert info.n_iter <= 1


def test_cg_warns_when_it_stops_early():
    features, prev, target = _problem()
    with pytest.warns(ConvergenceWarning, match="stopped after 2 iterations"):
        solve_ridge(features, prev, target, np.full(30, 1e-6), True, solver="cg", tol=1e-14, max_iter=2)


def test_bad_solver_and_shapes_raise():
    features, prev, target = _problem()
    with pytest.raises(SimfluenceError, match="unknown solver"):
        solve_ridge(features, prev, target, 1.0, True, solver="magic")
    with pytest.raises(SimfluenceError, match="shape mismatch"):
        solve_ridge(features, prev[:-1], target, 1.0, True)


def _multi_problem(seed=3, n_trans=300, n_features=40, n_test=5):
    features, prev, target = _problem(seed=seed, n_trans=n_trans, n_features=n_features, n_test=n_test, density=0.1)
    return features, prev, target, np.full(2 * n_features, 0.05)


def test_float32_iterations_with_float64_refinement_meet_the_same_tolerance():
    features, prev, target, penalty = _multi_problem()
    exact = _brute_force(features, prev, target, penalty, True)
    theta, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-11, dtype=np.float32)
    assert info.dtype == "float32" and info.n_refine >= 2 and info.max_residual <= 1e-11
    np.testing.assert_allclose(theta, exact, rtol=1e-7, atol=1e-9 * np.abs(exact).max())


def test_float32_alone_at_a_loose_tolerance_is_accurate_to_that_tolerance():
    features, prev, target, penalty = _multi_problem()
    exact = _brute_force(features, prev, target, penalty, True)
    theta, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-5, dtype=np.float32)
    assert info.n_refine == 0
    assert np.abs(theta - exact).max() <= 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_warm_start_gives_the_same_answer(dtype):
    features, prev, target, penalty = _multi_problem()
    cold, _ = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12, dtype=dtype)
    near, _ = solve_ridge(features, prev, target, penalty * 3, True, solver="cg", tol=1e-12, dtype=dtype)
    warm, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12, dtype=dtype, x0=near)
    np.testing.assert_allclose(warm, cold, rtol=1e-8, atol=1e-10 * np.abs(cold).max())


@pytest.mark.parametrize("multiplicative", [True, False])
def test_torch_and_scipy_kernels_agree(multiplicative):
    pytest.importorskip("torch")
    features, prev, target, penalty = _multi_problem()
    penalty = penalty if multiplicative else penalty[: features.shape[1]]
    by_scipy, a = solve_ridge(features, prev, target, penalty, multiplicative, solver="cg", tol=1e-12, kernel="scipy")
    by_torch, b = solve_ridge(features, prev, target, penalty, multiplicative, solver="cg", tol=1e-12, kernel="torch")
    assert (a.kernel, b.kernel) == ("scipy", "torch")
    np.testing.assert_allclose(by_torch, by_scipy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_several_right_hand_sides_per_test_example_are_solved_together(solver):
    features, prev, target, penalty = _multi_problem()
    second = np.random.default_rng(9).normal(size=target.shape)
    both, _ = solve_ridge(features, prev, np.concatenate([target, second], axis=1), penalty, True, solver=solver,
                          tol=1e-13)
    n_test = target.shape[1]
    np.testing.assert_allclose(both[:, :n_test], _brute_force(features, prev, target, penalty, True), rtol=1e-8)
    np.testing.assert_allclose(both[:, n_test:], _brute_force(features, prev, second, penalty, True), rtol=1e-8)


def test_small_memory_budget_solves_in_blocks_with_the_same_answer(monkeypatch):
    import simfluence.solvers as solvers

    features, prev, target, penalty = _multi_problem()
    whole, _ = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12)
    monkeypatch.setattr(solvers, "_CG_BLOCK_BYTES", 1)
    blocked, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12)
    assert info.n_blocks == target.shape[1]
    np.testing.assert_allclose(blocked, whole, rtol=1e-9, atol=1e-12)


def test_unknown_kernel_and_dtype_raise():
    features, prev, target, penalty = _multi_problem()
    with pytest.raises(SimfluenceError, match="unknown kernel"):
        solve_ridge(features, prev, target, penalty, True, solver="cg", kernel="cuda-magic")
    with pytest.raises(SimfluenceError, match="dtype"):
        solve_ridge(features, prev, target, penalty, True, solver="cg", dtype=np.float16)


@pytest.mark.parametrize("multiplicative", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-12), (np.float32, 1e-11), (np.float32, 1e-5)])
def test_torch_device_path_agrees_with_the_numpy_path(multiplicative, dtype, tol):
    pytest.importorskip("torch")
    features, prev, target, penalty = _multi_problem()
    penalty = penalty if multiplicative else penalty[: features.shape[1]]
    exact = _brute_force(features, prev, target, penalty, multiplicative)
    by_numpy, a = solve_ridge(features, prev, target, penalty, multiplicative, solver="cg", tol=tol, dtype=dtype)
    by_torch, b = solve_ridge(features, prev, target, penalty, multiplicative, solver="cg", tol=tol, dtype=dtype,
                              device="cpu")
    assert b.kernel == "torch:cpu" and b.max_residual <= tol and abs(b.n_iter - a.n_iter) <= 2
    assert b.n_refine == a.n_refine
    scale = np.abs(exact).max()
    assert np.abs(by_torch - exact).max() <= 10 * tol * scale + 1e-12
    assert np.abs(by_torch - by_numpy).max() <= 10 * tol * scale + 1e-12


def test_torch_device_path_solves_in_blocks_and_warm_starts(monkeypatch):
    pytest.importorskip("torch")
    import simfluence.solvers as solvers

    features, prev, target, penalty = _multi_problem()
    exact = _brute_force(features, prev, target, penalty, True)
    monkeypatch.setattr(solvers, "_CG_BLOCK_BYTES", 1)
    theta, info = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-12, device="cpu")
    assert info.n_blocks == target.shape[1]
    np.testing.assert_allclose(theta, exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())
    _, warm = solve_ridge(features, prev, target, penalty, True, solver="cg", tol=1e-10, device="cpu", x0=theta)
    assert warm.n_iter <= 1


def test_torch_kernel_runs_on_one_thread_on_a_loaded_machine(monkeypatch):
    torch = pytest.importorskip("torch")
    from simfluence import solvers

    features, _, _, _ = _multi_problem()
    dense = np.random.default_rng(2).normal(size=(features.shape[1], 6))
    monkeypatch.setattr(solvers.os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    before = torch.get_num_threads()
    loaded = solvers.SparseProducts(features, np.float64, "torch")
    assert loaded.threads == 1
    np.testing.assert_allclose(loaded.forward(dense), features @ dense, rtol=1e-12)
    assert torch.get_num_threads() == before  # set around each product only
    monkeypatch.setattr(solvers.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = solvers.SparseProducts(features, np.float64, "torch")
    assert idle.threads == min(before, solvers.os.cpu_count())
    assert solvers.fastest_products(features, np.float64).kernel in ("scipy", "torch")
