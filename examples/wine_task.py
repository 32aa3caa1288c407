"""Logistic regression on scikit-learn's bundled wine data (178 wines, 13 features, 3 cultivars)."""
import functools

import numpy as np
import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.nn import functional

from simfluence.task import Task


def logistic_regression(seed):
    return nn.Linear(13, 3)


def sgd(params):
    return torch.optim.SGD(params, lr=0.0)


def step_decay(step):
    return 0.1 if step <= 15 else 0.03


def make_task():
    features, labels = load_wine(return_X_y=True)
    rows = np.random.default_rng(0).permutation(len(labels))
    test_rows, pool_rows = rows[:30], rows[30:]
    mean, scale = features[pool_rows].mean(axis=0), features[pool_rows].std(axis=0)
    inputs = torch.from_numpy(((features - mean) / scale).astype(np.float32))
    targets = torch.from_numpy(labels.astype(np.int64))
    return Task(
        make_model=logistic_regression,
        pool_inputs=inputs[pool_rows], pool_targets=targets[pool_rows],
        test_inputs=inputs[test_rows], test_targets=targets[test_rows],
        loss_fn=functools.partial(functional.cross_entropy, reduction="none"),
        make_optimizer=sgd,
        lr_at=step_decay,
        metadata={"task": "wine logistic regression"},
        pool_ids=[int(row) for row in pool_rows],       # dataset rows: ints, not 0..n-1
        test_ids=[f"w{i}" for i in range(30)],           # strings
        init_seed=7,
    )
