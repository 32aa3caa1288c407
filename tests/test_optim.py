"""simfluence.optim.AdamW (eps inside the square root): its formula, its state, and exact unrolled replays of it."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.nn import functional

from simfluence.attribution.unrolled import replay_losses, unrolled_effects
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import SimfluenceError, TaskError
from simfluence.optim import Adam, AdamW
from simfluence.runlog import RunSet
from simfluence.task import Task, check_recorded_settings, task_fingerprint_parts
from simfluence.training import generate_runs


def tanh_mlp(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def root_adamw(params, eps_root: float = 1e-6, weight_decay: float = 0.1):
    return AdamW(params, lr=0.0, eps_root=eps_root, weight_decay=weight_decay)


def root_adam_l2(params):
    return Adam(params, lr=0.0, eps_root=1e-3, weight_decay=0.1)


def wine_task(make_optimizer=root_adamw, dtype: torch.dtype = torch.float64, n_pool: int = 24,
              n_test: int = 5) -> Task:
    """Standardised wine rows, a 13-8-3 tanh MLP, the given optimizer, a decaying learning rate from 0.01."""
    features, labels = load_wine(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    order = np.random.default_rng(0).permutation(len(labels))
    pool, test = order[:n_pool], order[n_pool:n_pool + n_test]
    inputs, targets = torch.tensor(features, dtype=dtype), torch.tensor(labels)
    return Task(make_model=functools.partial(tanh_mlp, dtype=dtype), pool_inputs=inputs[pool],
                pool_targets=targets[pool], test_inputs=inputs[test], test_targets=targets[test],
                loss_fn=functools.partial(functional.cross_entropy, reduction="none"),
                make_optimizer=make_optimizer, lr_at=lambda step: 0.01 * (1.0 - 0.5 * step / 40))


def retrain(task: Task, curriculum: Curriculum, weights: np.ndarray | None = None) -> np.ndarray:
    """Train for real with the task's optimizer, occurrence j weighted ``weights[j]`` in its batch's mean loss;
    returns the (T + 1, n_test) test losses."""
    model = task.make_model(task.init_seed)
    optimizer = task.make_optimizer(model.parameters())
    weights = np.ones(curriculum.n_entries) if weights is None else weights

    def test_losses() -> np.ndarray:
        with torch.no_grad():
            return task.loss_fn(model(task.test_inputs), task.test_targets).numpy()

    losses = [test_losses()]
    for step in range(1, curriculum.n_steps + 1):
        lo, hi = curriculum.offsets[step - 1], curriculum.offsets[step]
        if hi > lo:
            for group in optimizer.param_groups:
                group["lr"] = task.lr_at(step)
            index = torch.tensor(curriculum.ids[lo:hi].tolist())
            optimizer.zero_grad(set_to_none=True)
            per_example = task.loss_fn(model(task.pool_inputs[index]), task.pool_targets[index])
            ((torch.as_tensor(weights[lo:hi]) * per_example).sum() / (hi - lo)).backward()
            optimizer.step()
        losses.append(test_losses())
    return np.stack(losses)


def parameters_after(make_optimizer, n_steps: int = 6) -> list[torch.Tensor]:
    """Parameters of the wine MLP after ``n_steps`` full-batch steps (lr 0.01) with ``make_optimizer``."""
    task = wine_task(make_optimizer)
    model = task.make_model(0)
    optimizer = make_optimizer(model.parameters())
    for _ in range(n_steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.01
        optimizer.zero_grad()
        task.loss_fn(model(task.pool_inputs), task.pool_targets).mean().backward()
        optimizer.step()
    return [param.detach().clone() for param in model.parameters()]


# ------------------------------------------------------------------ the update
@pytest.mark.parametrize("our_class, torch_class", [(AdamW, torch.optim.AdamW), (Adam, torch.optim.Adam)])
def test_with_eps_root_zero_it_is_torchs_adam(our_class, torch_class):
    ours = parameters_after(lambda params: our_class(params, eps=1e-8, eps_root=0.0, weight_decay=0.1))
    theirs = parameters_after(lambda params: torch_class(params, eps=1e-8, weight_decay=0.1))
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


def test_each_step_follows_the_eps_inside_the_square_root_formula():
    rng = np.random.default_rng(0)
    gradients = rng.normal(scale=1e-3, size=(4, 5))  # small gradients: eps_root dominates the denominator
    param = torch.tensor(rng.normal(size=5), requires_grad=True)
    optimizer = AdamW([param], lr=0.1, betas=(0.9, 0.99), eps=1e-8, eps_root=1e-4, weight_decay=0.05)
    expected, m, v = param.detach().numpy().copy(), np.zeros(5), np.zeros(5)
    for step, gradient in enumerate(gradients, start=1):
        param.grad = torch.tensor(gradient)
        optimizer.step()
        m, v = 0.9 * m + 0.1 * gradient, 0.99 * v + 0.01 * gradient**2
        m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.99**step)
        expected = expected * (1 - 0.1 * 0.05) - 0.1 * m_hat / (np.sqrt(v_hat + 1e-4) + 1e-8)
        np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-12)
    assert optimizer.state[param]["step"].item() == 4


def test_a_checkpointed_optimizer_continues_exactly():
    task = wine_task()
    model = task.make_model(0)
    optimizer = task.make_optimizer(model.parameters())

    def steps(model, optimizer, count):
        for _ in range(count):
            for group in optimizer.param_groups:
                group["lr"] = 0.01
            optimizer.zero_grad()
            task.loss_fn(model(task.pool_inputs), task.pool_targets).mean().backward()
            optimizer.step()

    steps(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)  # as training saves
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved_model, saved_optimizer = saved["model"], saved["optimizer"]
    assert set(saved_optimizer["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = task.make_model(0)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = task.make_optimizer(resumed.parameters())
    resumed_optimizer.load_state_dict(saved_optimizer)
    steps(model, optimizer, 3)
    steps(resumed, resumed_optimizer, 3)
    for mine, reference in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, reference)


def test_bad_hyper_parameters_are_named():
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(SimfluenceError, match="eps_root"):
        AdamW(params, eps_root=-1.0)
    with pytest.raises(SimfluenceError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(SimfluenceError, match="eps > 0 or eps_root > 0"):
        AdamW(params, eps=0.0, eps_root=0.0)


# ------------------------------------------------------------------ unrolled replays it
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replay_reproduces_a_logged_run_bit_for_bit(tmp_path, dtype):
    task = wine_task(dtype=dtype)
    curriculum = random_curricula(1, 24, 4, 15, seed=0)[0]
    run = generate_runs(task, [curriculum], tmp_path / "runs", workers=1, progress=False, seeds=[3])[0]
    replayed = replay_losses(task, curriculum, seed=3, dtype=None)
    np.testing.assert_array_equal(replayed.astype(np.float32), run.losses)
    np.testing.assert_array_equal(replayed, retrain(task, curriculum))  # and the plain loop, in full precision


@pytest.mark.parametrize("make_optimizer", [root_adamw, root_adam_l2])
def test_unrolled_effects_equal_finite_differences_of_real_retraining(make_optimizer):
    task = wine_task(make_optimizer)
    batches = [list(batch) for batch in random_curricula(1, 24, 4, 12, seed=0)[0].batches()]
    batches[3] = []  # an empty batch: no update, no step of the bias correction
    curriculum = Curriculum.from_batches(batches, 24)
    effects = unrolled_effects(task, curriculum, target_steps=[6], checkpoint_every=5)
    np.testing.assert_allclose(effects.losses, retrain(task, curriculum), rtol=0, atol=1e-12)
    h = 1e-5
    for entry in (0, 7, curriculum.n_entries - 1):
        up, down = np.ones(curriculum.n_entries), np.ones(curriculum.n_entries)
        up[entry] += h
        down[entry] -= h
        difference = (retrain(task, curriculum, up) - retrain(task, curriculum, down)) / (2 * h)
        for k, step in enumerate(effects.target_steps):
            if curriculum.step_of_entries()[entry] <= step:
                truth = difference[step]
                error = np.abs(effects.occurrence[entry, k] - truth).max() / np.abs(truth).max()
                assert error < 1e-6


# ------------------------------------------------------------------ the task knows it
def test_the_fingerprint_tells_eps_inside_from_eps_outside():
    inside = task_fingerprint_parts(wine_task())["optimizer"]
    other_root = task_fingerprint_parts(wine_task(functools.partial(root_adamw, eps_root=1e-4)))["optimizer"]
    outside = task_fingerprint_parts(wine_task(lambda params: torch.optim.AdamW(params, eps=1e-6)))["optimizer"]
    assert len({inside, other_root, outside}) == 3


def test_recorded_eps_root_must_match_the_task(tmp_path):
    task = wine_task()
    curriculum = random_curricula(1, 24, 4, 3, seed=0)[0]
    generate_runs(task, [curriculum], tmp_path / "runs", workers=1, progress=False)
    runset = RunSet.load(tmp_path / "runs")
    runset.metadata["optimizer"] = {"kind": "adamw", "eps_root": 1e-6, "eps": 0.0, "weight_decay": 0.1}
    check_recorded_settings(task, runset, runset[0])
    runset.metadata["optimizer"]["eps_root"] = 0.0
    with pytest.raises(TaskError, match="eps_root"):
        check_recorded_settings(task, runset, runset[0])
    plain = wine_task(lambda params: torch.optim.AdamW(params, lr=0.0, weight_decay=0.1))
    runset.metadata["optimizer"]["eps_root"] = 1e-6
    with pytest.raises(TaskError, match="eps"):
        check_recorded_settings(plain, runset, runset[0])
