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
