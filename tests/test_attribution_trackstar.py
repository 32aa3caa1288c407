"""TrackStar: unit-normalised scores are cosines; each ingredient does what it says and can be switched off."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from simfluence.attribution.checkpoints import Checkpoint
from simfluence.attribution.gradients import per_example_gradients
from simfluence.attribution.tracin import tracin_scores
from simfluence.attribution.trackstar import choose_mixing, trackstar_scores
from simfluence.errors import SimfluenceError


def cross_entropy(outputs, targets):
    return functional.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture(scope="module")
def adam_problem():
    """A tiny MLP after 5 Adam steps, its checkpoint (with exp_avg_sq), a pool and test examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    pool_x, pool_y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    test_x, test_y = torch.randn(12, 6), torch.randint(0, 4, (12,))
    test_x[0], test_y[0] = pool_x[7], pool_y[7]  # a test example that is also in the pool
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(5):
        optimizer.zero_grad()
        cross_entropy(model(pool_x[step * 8:(step + 1) * 8]), pool_y[step * 8:(step + 1) * 8]).mean().backward()
        optimizer.step()
    checkpoint = Checkpoint(step=5, learning_rate=0.01, model_state=copy.deepcopy(model.state_dict()),
                            optimizer_state=copy.deepcopy(optimizer.state_dict()))
    return model, checkpoint, pool_x, pool_y, test_x, test_y


def test_unit_normalised_scores_are_cosines_in_minus_one_one(adam_problem):
    model, checkpoint, pool_x, pool_y, test_x, test_y = adam_problem
    scores, info = trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [checkpoint],
                                    projection_dim=32, return_info=True)
    assert scores.shape == (40, 12)
    assert np.all(np.abs(scores) <= 1 + 1e-12)
    assert scores[7, 0] == pytest.approx(1.0, abs=1e-12)  # an example is its own perfect match
    (entry,) = info["checkpoints"]
    assert entry["optimizer_correction"] == "applied" and entry["dim"] == 32 and 0 < entry["lam"] < 1


def test_with_every_ingredient_off_but_normalisation_trackstar_is_gradient_cosine(adam_problem):
    model, checkpoint, pool_x, pool_y, test_x, test_y = adam_problem
    plain = trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [checkpoint],
                             optimizer_correction=False, projection_dim=None, hessian="none")
    cosine = tracin_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [checkpoint], variant="cosine")
    np.testing.assert_allclose(plain, cosine / checkpoint.learning_rate, atol=1e-10)


def test_optimizer_correction_divides_by_adams_bias_corrected_second_moment(adam_problem):
    model, checkpoint, pool_x, pool_y, test_x, test_y = adam_problem
    corrected = trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [checkpoint],
                                 projection_dim=None, hessian="none", unit_normalize=False)
    trained = copy.deepcopy(model)
    trained.load_state_dict(checkpoint.model_state)
    scale = []
    for index, _ in enumerate(trained.parameters()):
        state = checkpoint.optimizer_state["state"][index]
        v_hat = state["exp_avg_sq"].double() / (1 - 0.999 ** float(state["step"]))
        scale.append((v_hat.sqrt() + 1e-8).reshape(-1))
    scale = torch.cat(scale)
    pool = per_example_gradients(trained, cross_entropy, pool_x, pool_y, dtype=torch.float64) / scale
    test = per_example_gradients(trained, cross_entropy, test_x, test_y, dtype=torch.float64) / scale
    np.testing.assert_allclose(corrected, (pool @ test.T).numpy(), rtol=1e-9)


def test_the_correction_adds_eps_root_inside_the_square_root_as_the_smooth_adam_does(adam_problem):
    """simfluence.optim.Adam saves ``eps_root`` in its parameter groups; its preconditioner is
    sqrt(v_hat + eps_root) + eps, so TrackStar's correction must be too."""
    from simfluence.attribution.trackstar import second_moment_scale

    model, checkpoint, *_ = adam_problem
    smooth = copy.deepcopy(checkpoint)
    for group in smooth.optimizer_state["param_groups"]:
        group["eps_root"] = 1e-3
    plain, rooted = second_moment_scale(model, checkpoint), second_moment_scale(model, smooth)
    np.testing.assert_allclose(rooted, ((plain - 1e-8) ** 2 + 1e-3).sqrt() + 1e-8, rtol=1e-9)


def test_sgd_checkpoints_skip_the_optimizer_correction_and_say_so(adam_problem):
    model, checkpoint, pool_x, pool_y, test_x, test_y = adam_problem
    sgd_checkpoint = Checkpoint(step=5, learning_rate=0.01, model_state=checkpoint.model_state,
                                optimizer_state={"state": {}, "param_groups": [{"params": [0, 1, 2, 3]}]})
    with_correction, info = trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y,
                                             [sgd_checkpoint], projection_dim=16, return_info=True)
    without = trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [sgd_checkpoint],
                               projection_dim=16, optimizer_correction=False)
    assert info["checkpoints"][0]["optimizer_correction"].startswith("skipped")
    np.testing.assert_array_equal(with_correction, without)


def test_automatic_mixing_puts_the_eigenvalue_crossing_at_component_k():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 10, generator=generator, dtype=torch.float64)
    b = torch.randn(50, 10, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, 10)
    r_eval, r_train = a.T @ a / 30, b.T @ b / 50
    lam = choose_mixing(r_eval, r_train, k=3)
    e = torch.linalg.eigvalsh(r_eval).flip(0)
    t = torch.linalg.eigvalsh(r_train).flip(0)
    assert lam * float(e[2]) == pytest.approx((1 - lam) * float(t[2]), rel=1e-12)


def test_bad_mixing_weight_is_a_clear_error(adam_problem):
    model, checkpoint, pool_x, pool_y, test_x, test_y = adam_problem
    with pytest.raises(SimfluenceError, match="lam must lie in"):
        trackstar_scores(model, cross_entropy, pool_x, pool_y, test_x, test_y, [checkpoint], lam=1.5)
