"""The README's Python quickstart runs as written (against the committed mini run set)."""
from __future__ import annotations

import re
from pathlib import Path

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
    assert namespace["best"].predicted_change <= 0
