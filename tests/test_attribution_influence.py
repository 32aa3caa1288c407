"""Influence functions: they predict real leave-one-out retraining on a convex model; solvers agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional

from simfluence.attribution.influence import hessian_matrix, hvp_function, influence_scores
from simfluence.errors import SimfluenceError

# forward-mode autodiff in torch loads jit-scripted decompositions once, which warns; not our code
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

L2 = 0.05
N_TRAIN = 100


def logistic_loss(outputs, targets):
    return functional.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets, reduction="none")


def cross_entropy(outputs, targets):
    return functional.cross_entropy(outputs, targets, reduction="none")


def train_logistic(model, inputs, targets, weights):
    """Minimise ``sum_i w_i loss_i / N_TRAIN + L2/2 |theta|^2`` to machine precision (L-BFGS, warm start)."""
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-13,
                                  tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        objective = (weights * logistic_loss(model(inputs), targets)).sum() / N_TRAIN
        objective = objective + 0.5 * L2 * sum((p ** 2).sum() for p in model.parameters())
        objective.backward()
        return objective

    for _ in range(5):
        optimizer.step(closure)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: a second intra-op thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + 200]
    mean, scale = features[train].mean(axis=0), features[train].std(axis=0)
    inputs = torch.from_numpy((features - mean) / scale)
    targets = torch.from_numpy(labels.astype(np.float64))
    torch.manual_seed(0)
    model = nn.Linear(30, 1).double()
    train_logistic(model, inputs[train], targets[train], torch.ones(N_TRAIN, dtype=torch.float64))
    return model, inputs[train], targets[train], inputs[test], targets[test]


def test_influence_predicts_leave_one_out_retraining_on_logistic_regression(breast_cancer):
    model, train_x, train_y, test_x, test_y = breast_cancer
    with torch.no_grad():
        test_losses = logistic_loss(model(test_x), test_y)
    probes = torch.argsort(test_losses, descending=True)[:3]  # the hardest test points move the most
    scores = influence_scores(model, logistic_loss, train_x, train_y, test_x[probes], test_y[probes],
                              damping=L2, hessian="exact", solver="exact")
    actual = np.zeros((N_TRAIN, len(probes)))
    for i in range(N_TRAIN):
        weights = torch.ones(N_TRAIN, dtype=torch.float64)
        weights[i] = 0.0
        retrained = _warm_retrain(model, train_x, train_y, weights)
        with torch.no_grad():
            actual[i] = (logistic_loss(retrained(test_x[probes]), test_y[probes]) - test_losses[probes]).numpy()
    for probe in range(len(probes)):
        rho = spearmanr(scores[:, probe], actual[:, probe]).statistic
        assert rho >= 0.9, f"probe {probe}: Spearman {rho:.3f}"
        # removing example i changes the loss by about score / n (first order); the slope is near 1
        slope = np.polyfit(scores[:, probe] / N_TRAIN, actual[:, probe], 1)[0]
        assert 0.7 < slope < 1.5


def _warm_retrain(model, inputs, targets, weights):
    retrained = nn.Linear(30, 1).double()
    retrained.load_state_dict(model.state_dict())
    return train_logistic(retrained, inputs, targets, weights)


@pytest.fixture(scope="module")
def small_mlp_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs = torch.randn(40, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (40,))
    return model, inputs, targets


def test_gauss_newton_equals_exact_hessian_for_a_linear_model(breast_cancer):
    model, train_x, train_y, _, _ = breast_cancer
    exact = hessian_matrix(model, logistic_loss, train_x, train_y, kind="exact")
    gauss_newton = hessian_matrix(model, logistic_loss, train_x, train_y, kind="gauss_newton")
    assert torch.allclose(exact, gauss_newton, atol=1e-10)


def test_hessian_vector_products_match_the_hessian(small_mlp_problem):
    model, inputs, targets = small_mlp_problem
    columns = torch.randn(51, 3, dtype=torch.float64)
    for kind in ("exact", "gauss_newton"):
        matrix = hessian_matrix(model, cross_entropy, inputs, targets, kind=kind, chunk_size=7)
        matvec, n_params = hvp_function(model, cross_entropy, inputs, targets, kind=kind, chunk_size=16)
        assert n_params == 4 * 6 + 6 + 6 * 3 + 3
        assert torch.allclose(matvec(columns), matrix @ columns, atol=1e-10)


@pytest.mark.parametrize("hessian", ["exact", "gauss_newton"])
def test_cg_and_lissa_agree_with_the_exact_solve(small_mlp_problem, hessian):
    model, inputs, targets = small_mlp_problem
    test_x, test_y = inputs[:5] + 0.1, targets[:5]
    damping = 0.5  # keeps H + dI positive definite even for the exact (indefinite) Hessian
    exact = influence_scores(model, cross_entropy, inputs, targets, test_x, test_y, damping=damping,
                             hessian=hessian, solver="exact")
    cg, info = influence_scores(model, cross_entropy, inputs, targets, test_x, test_y, damping=damping,
                                hessian=hessian, solver="cg", cg_tol=1e-12, return_info=True)
    lissa = influence_scores(model, cross_entropy, inputs, targets, test_x, test_y, damping=damping,
                             hessian=hessian, solver="lissa", lissa_depth=400)
    assert info["iterations"] <= 51 + 5
    np.testing.assert_allclose(cg, exact, rtol=1e-7, atol=1e-9 * np.abs(exact).max())
    np.testing.assert_allclose(lissa, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_stochastic_lissa_is_close_to_the_exact_solve(small_mlp_problem):
    model, inputs, targets = small_mlp_problem
    exact = influence_scores(model, cross_entropy, inputs, targets, inputs[:4], targets[:4], damping=0.5,
                             hessian="gauss_newton")
    lissa = influence_scores(model, cross_entropy, inputs, targets, inputs[:4], targets[:4], damping=0.5,
                             hessian="gauss_newton", solver="lissa", lissa_depth=300, lissa_batch_size=20)
    assert np.corrcoef(exact.ravel(), lissa.ravel())[0, 1] > 0.98


def test_unknown_solver_is_a_clear_error(small_mlp_problem):
    model, inputs, targets = small_mlp_problem
    with pytest.raises(SimfluenceError, match="solver must be one of"):
        influence_scores(model, cross_entropy, inputs, targets, inputs, targets, solver="svd")


def test_auto_solves_matrix_free_above_the_parameter_threshold_and_agrees_with_the_dense_solve(small_mlp_problem,
                                                                                                monkeypatch):
    from simfluence.attribution import influence

    model, inputs, targets = small_mlp_problem
    test_x, test_y = inputs[:5] + 0.1, targets[:5]
    dense, dense_info = influence_scores(model, cross_entropy, inputs, targets, test_x, test_y, damping=0.5,
                                         hessian="gauss_newton", return_info=True)
    assert dense_info["solver"] == "exact"  # 51 parameters: small enough for the dense solve
    monkeypatch.setattr(influence, "DENSE_MAX_PARAMS", 50)

    def no_dense_hessian(*args, **kwargs):
        raise AssertionError("the dense Hessian was built")
    monkeypatch.setattr(influence, "hessian_matrix", no_dense_hessian)
    free, free_info = influence_scores(model, cross_entropy, inputs, targets, test_x, test_y, damping=0.5,
                                       hessian="gauss_newton", return_info=True)
    assert free_info["solver"] == "cg" and free_info["n_params"] == 51
    np.testing.assert_allclose(free, dense, rtol=1e-6, atol=1e-8 * np.abs(dense).max())


def test_a_dense_hessian_too_large_for_memory_is_refused_before_it_is_allocated():
    torch.manual_seed(0)
    model = nn.Linear(300, 330).double()  # 99,330 parameters, as a tiny GPT-2: an 88 GB dense Hessian
    inputs, targets = torch.randn(8, 300, dtype=torch.float64), torch.randint(0, 330, (8,))
    for call in (lambda: influence_scores(model, cross_entropy, inputs, targets, inputs[:2], targets[:2],
                                          solver="exact"),
                 lambda: hessian_matrix(model, cross_entropy, inputs, targets)):
        with pytest.raises(SimfluenceError, match=r"a dense Hessian of 99330 parameters needs 73.5 GiB \(more than 4 "
                                                  r"GiB\): use solver='cg' or 'auto'"):
            call()  # (an attempt to allocate 73.5 GiB would have failed with the allocator's error instead)


@pytest.mark.parametrize("kind", ["exact", "gauss_newton"])
def test_hessian_products_through_attention_without_forward_mode_match_finite_differences(kind):
    """torch's fused CPU attention has no forward-mode or second derivative: the products use its math kernel
    (checked against central differences of the gradient; Gauss-Newton: symmetric, positive semi-definite)."""
    from simfluence.workloads.tinylm import TinyLM, TinyLMConfig, token_nll

    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=11, max_len=6, d_model=8, n_layers=1, n_heads=2, d_ff=16)).double()
    tokens = torch.randint(3, 11, (5, 6))
    targets = torch.roll(tokens, -1, dims=1)
    matvec, n_params = hvp_function(model, token_nll, tokens, targets, kind=kind, chunk_size=2)
    directions = torch.randn(n_params, 2, dtype=torch.float64)
    products = matvec(directions)
    assert products.shape == (n_params, 2)
    theta = torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])

    def unflatten(flat):
        out, start = {}, 0
        for name, parameter in model.named_parameters():
            out[name] = flat[start:start + parameter.numel()].reshape(parameter.shape)
            start += parameter.numel()
        return out

    def gradient(flat):
        flat = flat.detach().requires_grad_(True)
        loss = token_nll(torch.func.functional_call(model, unflatten(flat), (tokens,)), targets).mean()
        return torch.autograd.grad(loss, flat)[0]

    if kind == "exact":
        step = 1e-5
        for column in range(2):
            v = directions[:, column]
            expected = (gradient(theta + step * v) - gradient(theta - step * v)) / (2 * step)
            np.testing.assert_allclose(products[:, column].numpy(), expected.numpy(), rtol=1e-3, atol=1e-5)
    else:  # Gauss-Newton is symmetric positive semi-definite: v^T G v >= 0, G symmetric
        gram = directions.T @ products
        assert torch.allclose(gram, gram.T, atol=1e-10) and (torch.diagonal(gram) >= -1e-12).all()
