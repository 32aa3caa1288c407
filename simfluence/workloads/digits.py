"""The built-in ``digits`` workload: a small MLP trained on scikit-learn's bundled 8x8 digit images.

It needs no download (``sklearn.datasets.load_digits`` ships with scikit-learn) and trains in milliseconds
per run, so it is the reference workload for tests, examples and benchmarks. :func:`digits_task` builds the
:class:`~simfluence.task.Task`: a disjoint pool / test split of the 1,797 images, features
standardised with the pool's statistics, optionally a fraction of the pool labels flipped to a wrong class
(the "noisy" examples an attribution method should find), a 64-64-10 ReLU MLP, SGD with momentum or Adam,
and a warm-up + cosine learning-rate schedule. :func:`generate_digits` draws random-subset curricula and
trains one run per curriculum with :func:`~simfluence.training.generate_random_runs`.

Run-set metadata records ``pool_labels`` (the labels trained on, noise included), ``pool_clean_labels``,
``noisy_pool_ids``, ``test_labels`` and the dataset row of every pool and test example.
"""
from __future__ import annotations

import functools
import inspect
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from simfluence.errors import SimfluenceError
from simfluence.optim import Adam
from simfluence.runlog import RunSet
from simfluence.task import Task
from simfluence.training import WarmupCosine, generate_random_runs

__all__ = ["digits_task", "digits_task_from_runset", "generate_digits", "DEFAULT_PEAK_LR", "SMOOTH"]

N_FEATURES = 64
N_CLASSES = 10
DEFAULT_PEAK_LR = {"sgd": 0.02, "adam": 0.003}
# the smooth training recipe (generate_digits(smooth=True), docs/smooth_training.md), chosen by metasmoothness
# (benchmarks/bench_smooth_settings.py): on this MLP batches of 32 smooth training most, and at batches of 32 SGD
# scores above Adam with eps inside or outside the square root
SMOOTH = {"optimizer": "sgd", "eps_root": 0.0, "batch_size": 32}


def mlp(seed: int, sizes: tuple[int, ...]) -> nn.Sequential:
    """ReLU MLP with layer widths ``sizes`` (input first), initialised under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


def _sgd(params, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0, momentum=momentum)


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.0)


def _adam_root(params, eps_root: float) -> torch.optim.Optimizer:
    return Adam(params, lr=0.0, eps=0.0, eps_root=eps_root)


def digits_task(
    pool_size: int = 500,
    test_size: int = 100,
    n_steps: int = 200,
    optimizer: str = "sgd",
    lr: float | None = None,
    warmup_steps: int | None = None,
    momentum: float = 0.9,
    hidden: int = 64,
    label_noise: float = 0.0,
    data_seed: int = 0,
    eps_root: float = 0.0,
) -> Task:
    """The digits task: pool / test split, standardised features, noisy labels, MLP, optimizer, schedule.

    Parameters
    ----------
    pool_size, test_size : disjoint random examples of the 1,797 images (chosen with ``data_seed``).
    n_steps : length of the runs (sets the learning-rate schedule).
    optimizer : ``"sgd"`` (with ``momentum``) or ``"adam"``.
    lr : peak learning rate (default ``DEFAULT_PEAK_LR[optimizer]``).
    warmup_steps : linear warm-up length (default 10% of ``n_steps``); cosine decay to 10% of the peak after.
    hidden : hidden width of the 64-hidden-10 MLP.
    label_noise : fraction of pool examples whose label is replaced by a different, random class.
    data_seed : seed of the split and of the label noise.
    eps_root : with ``"adam"``, above 0: :class:`simfluence.optim.Adam` with this epsilon inside the square root
        (and none outside); 0: ``torch.optim.Adam`` (eps 1e-8 outside).

    Returns
    -------
    Task with pool inputs (pool_size, 64) float32, targets (pool_size,) int64, and likewise for the test set.
    """
    from sklearn.datasets import load_digits

    if optimizer not in DEFAULT_PEAK_LR:
        raise SimfluenceError(f"optimizer must be one of {sorted(DEFAULT_PEAK_LR)}, got {optimizer!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise SimfluenceError(f"label_noise must lie in [0, 1], got {label_noise}")
    if not eps_root >= 0.0 or (eps_root > 0 and optimizer != "adam"):
        raise SimfluenceError(f"eps_root must be >= 0 and applies to optimizer 'adam' only, got {eps_root} with "
                              f"{optimizer!r}")
    features, labels = load_digits(return_X_y=True)
    if pool_size < 1 or test_size < 1 or pool_size + test_size > len(labels):
        raise SimfluenceError(
            f"pool_size + test_size must be at most {len(labels)} (both >= 1), got {pool_size} + {test_size}"
        )
    split_rng = np.random.default_rng([data_seed, 0])
    order = split_rng.permutation(len(labels))
    pool_rows, test_rows = order[:pool_size], order[pool_size:pool_size + test_size]
    mean = features[pool_rows].mean(axis=0)
    scale = features[pool_rows].std(axis=0)
    scale[scale == 0] = 1.0
    standardised = ((features - mean) / scale).astype(np.float32)

    clean_labels = labels[pool_rows].astype(np.int64)
    pool_labels = clean_labels.copy()
    noise_rng = np.random.default_rng([data_seed, 1])
    noisy_ids = np.sort(noise_rng.choice(pool_size, size=int(round(label_noise * pool_size)), replace=False))
    shift = noise_rng.integers(1, N_CLASSES, size=noisy_ids.size)  # never 0: a noisy label is always wrong
    pool_labels[noisy_ids] = (clean_labels[noisy_ids] + shift) % N_CLASSES

    peak = DEFAULT_PEAK_LR[optimizer] if lr is None else float(lr)
    warmup = max(1, round(0.1 * n_steps)) if warmup_steps is None else int(warmup_steps)
    schedule = WarmupCosine(peak=peak, n_steps=n_steps, warmup_steps=warmup, final_fraction=0.1)
    if optimizer == "sgd":
        make_optimizer, recorded = functools.partial(_sgd, momentum=momentum), {"momentum": momentum}
    elif eps_root > 0:
        make_optimizer, recorded = functools.partial(_adam_root, eps_root=eps_root), {"eps": 0.0, "eps_root": eps_root}
    else:
        make_optimizer, recorded = _adam, {}
    metadata = {
        "workload": "digits",
        "model": {"kind": "mlp", "sizes": [N_FEATURES, hidden, N_CLASSES], "activation": "relu"},
        "optimizer": {"kind": optimizer, **recorded},
        "lr_schedule": schedule.describe(),
        "loss": "cross_entropy",
        "label_noise": label_noise,
        "data_seed": data_seed,
        "pool_labels": pool_labels.tolist(),
        "pool_clean_labels": clean_labels.tolist(),
        "noisy_pool_ids": noisy_ids.tolist(),
        "test_labels": labels[test_rows].astype(np.int64).tolist(),
        "pool_dataset_rows": pool_rows.tolist(),
        "test_dataset_rows": test_rows.tolist(),
    }
    return Task(
        make_model=functools.partial(mlp, sizes=(N_FEATURES, hidden, N_CLASSES)),
        pool_inputs=torch.from_numpy(standardised[pool_rows]),
        pool_targets=torch.from_numpy(pool_labels),
        test_inputs=torch.from_numpy(standardised[test_rows]),
        test_targets=torch.from_numpy(labels[test_rows].astype(np.int64)),
        loss_fn=functools.partial(functional.cross_entropy, reduction="none"),
        make_optimizer=make_optimizer,
        lr_at=schedule,
        metadata=metadata,
    )


def digits_task_from_runset(runset: RunSet) -> Task:
    """Rebuild the :func:`digits_task` a digits run set was generated with, from its manifest metadata.

    Gradient-based attribution needs the model, the data and the loss of the runs; the manifest records the
    settings (split, label noise, model sizes, optimizer, schedule), and the rebuilt task is checked against
    the recorded labels and dataset rows, so a run set from another version of the data raises instead of
    silently mismatching.
    """
    meta = runset.metadata
    where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
    if meta.get("workload") != "digits":
        raise SimfluenceError(f"{where} was not generated by the digits workload (workload={meta.get('workload')!r})")
    try:
        sizes = meta["model"]["sizes"]
        schedule = meta["lr_schedule"]
        optimizer = meta["optimizer"]
        task = digits_task(
            pool_size=len(meta["pool_dataset_rows"]),
            test_size=len(meta["test_dataset_rows"]),
            n_steps=int(schedule["n_steps"]),
            optimizer=optimizer["kind"],
            lr=float(schedule["peak"]),
            warmup_steps=int(schedule["warmup_steps"]),
            momentum=float(optimizer.get("momentum", 0.9)),
            hidden=int(sizes[1]),
            label_noise=float(meta["label_noise"]),
            data_seed=int(meta["data_seed"]),
            eps_root=float(optimizer.get("eps_root", 0.0)),
        )
    except (KeyError, TypeError, IndexError) as err:
        raise SimfluenceError(f"{where}: digits metadata is incomplete ({err!r} missing or malformed)") from None
    checks = {
        "pool_dataset_rows": task.metadata["pool_dataset_rows"],
        "test_dataset_rows": task.metadata["test_dataset_rows"],
        "pool_labels": task.metadata["pool_labels"],
        "test_labels": task.metadata["test_labels"],
    }
    for key, rebuilt in checks.items():
        if meta.get(key) != rebuilt:
            raise SimfluenceError(f"{where}: the rebuilt digits task does not match the recorded {key}")
    if task.n_pool != runset.n_pool or task.n_test < runset.n_test:  # fewer tests: a run set of chosen tests
        raise SimfluenceError(f"{where}: rebuilt task has {task.n_pool} pool / {task.n_test} test examples, "
                              f"the run set {runset.n_pool} / {runset.n_test}")
    task.metadata.update({key: meta[key] for key in ("batch_size", "n_steps", "subset_size", "curriculum_seed")
                          if key in meta})
    return task


def generate_digits(
    out: str | os.PathLike,
    n_runs: int = 48,
    n_steps: int = 200,
    batch_size: int = 8,
    pool_size: int = 500,
    test_size: int = 100,
    subset_fraction: float = 0.5,
    optimizer: str = "sgd",
    label_noise: float = 0.0,
    seed: int = 0,
    workers: int | None = None,
    log_every: int = 1,
    checkpoint_steps: tuple[int, ...] = (),
    progress: bool = True,
    lr: float | None = None,
    data_seed: int = 0,
    overwrite: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    eps_root: float = 0.0,
    smooth: bool = False,
    device: str | None = None,
) -> RunSet:
    """Train ``n_runs`` digits MLPs, each on a random subset of the pool in random order, and log them to ``out``.

    Run r trains on ``round(subset_fraction * pool_size)`` pool examples drawn afresh, in shuffled epochs
    of ``batch_size`` (``simfluence.curriculum.random_curricula`` with ``seed``); every run starts from the
    same initial weights (``init_seed = seed``). Re-running over an existing folder resumes it (see
    :func:`~simfluence.training.generate_runs`, which also describes ``backend="ray"`` and
    ``ray_address``). ``eps_root``: see :func:`digits_task`. ``smooth``: the smooth training recipe
    :data:`SMOOTH` (larger batches) sets ``optimizer``, ``eps_root`` and ``batch_size``; giving one of them
    another value than its default is an error. ``device``: the torch device to train on (default the CPU; see
    :func:`~simfluence.training.generate_runs`).

    Returns
    -------
    RunSet of ``n_runs`` runs, each with ``n_steps`` steps and ``test_size`` test losses per logged step.
    """
    if smooth:
        parameters = inspect.signature(generate_digits).parameters
        given = {"optimizer": optimizer, "eps_root": eps_root, "batch_size": batch_size}
        for key, value in SMOOTH.items():
            if given[key] not in (parameters[key].default, value):
                raise SimfluenceError(f"smooth sets {key} = {value!r}; it cannot be combined with {key} = "
                                      f"{given[key]!r}")
        optimizer, eps_root, batch_size = SMOOTH["optimizer"], SMOOTH["eps_root"], SMOOTH["batch_size"]
    task = digits_task(pool_size=pool_size, test_size=test_size, n_steps=n_steps, optimizer=optimizer, lr=lr,
                       label_noise=label_noise, data_seed=data_seed, eps_root=eps_root)
    return generate_random_runs(task, out, n_runs=n_runs, n_steps=n_steps, batch_size=batch_size,
                                subset_fraction=subset_fraction, seed=seed, init_seed=seed, log_every=log_every,
                                checkpoint_steps=checkpoint_steps, workers=workers, progress=progress,
                                overwrite=overwrite, backend=backend, ray_address=ray_address, device=device)
