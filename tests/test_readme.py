"""The README's Python quickstart runs as written (against the committed mini run set) and does what it says."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart (Python)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"runs/digits-mini"', repr(str(ROOT / "runs" / "digits-mini")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    assert namespace["curves"].shape[0] == 3
    assert (tmp_path / "linear_mom.npz").exists()
    assert "rho_runs" in capsys.readouterr().out
    counterfactuals = readme.split("## Counterfactual curricula", 1)[1]
    block = re.search(r"```python\n(.*?)```", counterfactuals, re.S).group(1)
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - continues the quickstart's session

    # The search lowers its targets' predicted final loss by removing at most ``drop`` examples, and the
    # change it reports is what re-simulating the curriculum it found gives.
    call = re.search(r"search_curriculum\(.*?tests=(\[[^\]]*\]).*?drop=(\d+)", block)
    targets, drop = ast.literal_eval(call.group(1)), int(call.group(2))
    runset, sim, run, best = namespace["runset"], namespace["sim"], namespace["run"], namespace["best"]
    assert best.predicted_change < 0
    assert 1 <= len(best.removed) <= drop
    removed = runset.pool_positions(best.removed)
    assert (run.curriculum.counts(runset.n_pool)[removed] > 0).all()
    assert (best.curriculum.counts(runset.n_pool)[removed] == 0).all()
    columns = runset.test_positions(targets)
    curves = np.asarray(sim.simulate([run.curriculum, best.curriculum], run.initial_losses))
    before, after = curves[:, -1, columns].mean(axis=1)
    assert after - before == pytest.approx(best.predicted_change, rel=1e-6, abs=1e-12)


def test_readme_own_task_example_loads_and_its_commands_exist():
    from simfluence.cli import cli
    from simfluence.task import load_task

    task = load_task(f"{ROOT / 'examples' / 'wine_task.py'}:make_task")
    assert task.n_pool == 148 and task.n_test == 30 and task.test_ids[3] == "w3"
    section = (ROOT / "README.md").read_text().split("## Your own task", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^simfluence (\w+)(?: (\w+))?", section, re.M)
    assert len(commands) == 5
    for command, sub in commands:
        assert command in cli.commands, command
        if command == "generate":
            assert sub in cli.commands["generate"].commands
