"""Exact fast leave-one-out equals brute-force re-simulation for every variant of the linear family."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.curriculum import Curriculum
from simfluence.simulators import SimfluenceLinear
from simfluence.synthetic import known_linear_runset

VARIANTS = [
    {},
    {"alpha_center": 1.0, "step_terms": True, "lr_scaled": True},
    {"alpha_center": 1.0, "step_terms": True, "momentum": 0.7, "lr_scaled": True},
    {"batch_mean": True, "momentum": 0.5},
    {"multiplicative": False, "alpha_center": 1.0},
]


@pytest.fixture(scope="module")
def runset():
    schedule = np.linspace(0.1, 1.0, 30)
    return known_linear_runset(n_pool=25, n_test=4, n_runs=8, n_steps=30, batch_size=4, seed=0,
                               lr_schedule=schedule)[0]


def _brute_force(sim, curriculum, initial, step):
    base = sim.simulate(curriculum, initial, clip=False)[0, step]
    edited = [curriculum.remove([i]) for i in range(sim.A_.shape[0])]
    return sim.simulate(edited, initial, clip=False)[:, step] - base


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "paper")
@pytest.mark.parametrize("step", [None, 17])
def test_loo_equals_brute_force(runset, variant, step):
    sim = SimfluenceLinear(lam=1.0, **variant).fit(runset)
    curriculum = runset[0].curriculum.duplicate(3, step=5)  # a repeated id within one batch too
    initial = runset[0].initial_losses
    fast = sim.leave_one_out(curriculum, initial, step=step)
    brute = _brute_force(sim, curriculum, initial, 30 if step is None else step)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-8 * max(1.0, np.abs(brute).max()))
    assert np.abs(brute).max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("alpha_scale", [0.0, -1.5])
def test_loo_is_exact_with_zero_and_negative_alpha(runset, alpha_scale):
    sim = SimfluenceLinear(lam=1.0).fit(runset)
    sim.A_ = sim.A_ * alpha_scale  # alpha = 0 everywhere, or negative: no division, no log
    curriculum, initial = runset[1].curriculum, runset[1].initial_losses
    with np.errstate(all="raise"):
        fast = sim.leave_one_out(curriculum, initial)
    np.testing.assert_allclose(fast, _brute_force(sim, curriculum, initial, 30), atol=1e-8)


def test_loo_of_absent_examples_is_zero(runset):
    sim = SimfluenceLinear(lam=1.0).fit(runset)
    curriculum = runset[0].curriculum.keep_only(range(10))
    effects = sim.leave_one_out(curriculum, runset[0].initial_losses)
    assert np.all(effects[10:] == 0) and np.any(effects[:10] != 0)


@pytest.mark.parametrize("momentum", [0.0, 0.6])  # first order (scalar maps) and second order (2 x 2 maps)
def test_loo_is_exact_for_adjacent_repeated_and_last_step_occurrences(runset, momentum):
    sim = SimfluenceLinear(lam=1.0, momentum=momentum).fit(runset)
    rng = np.random.default_rng(1)
    batches = [list(rng.choice(np.arange(5, 25), 4, replace=False)) for _ in range(30)]
    for step in (0, 1, 2, 3):
        batches[step].append(0)  # steps 1-4 in a row: gaps of zero steps
    batches[5] += [1, 1]  # twice in one batch
    batches[29] += [1, 3]  # in the last step: nothing after it
    batches[0].append(2)  # only in step 1: a gap of 29 steps to the end
    curriculum = Curriculum.from_batches(batches, n_pool=25)
    initial = runset[0].initial_losses
    fast = sim.leave_one_out(curriculum, initial)
    brute = _brute_force(sim, curriculum, initial, 30)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-8 * max(1.0, np.abs(brute).max()))
    assert np.all(np.abs(brute[:4]).max(axis=1) > 1e-6)  # each constructed case has an effect


def test_the_simulators_package_has_no_import_circle():
    """dynamics uses loo, loo uses the step coefficients: no import (even inside a function) runs back."""
    import ast
    from pathlib import Path

    import simfluence.simulators as package

    folder = Path(package.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simfluence.simulators."):
                names.add(node.module.rsplit(".", 1)[1])
        imports[path.stem] = names - {"__init__"}

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(name == target or (name not in seen and reaches(name, target, seen | {name}))
                   for name in imports.get(start, ()))

    assert "loo" in imports["dynamics"] and "coefficients" in imports["loo"]
    assert [name for name in imports if reaches(name, name)] == []
