"""The evaluation report: what a fit fell back to is written where the results are read."""
from __future__ import annotations

from simfluence.apps.report import write_report
from simfluence.evaluation import evaluate
from simfluence.synthetic import known_linear_runset


def test_report_lists_the_warnings_of_each_fit(tmp_path):
    runset, _, _ = known_linear_runset(n_pool=20, n_test=4, n_runs=8, n_steps=12, batch_size=3, seed=1)
    evaluation = evaluate(runset, ["mean_curve", "linear"], holdout=2, params={"linear": {"lam": 1.0}})
    quiet = (write_report(evaluation, runset, tmp_path / "quiet")).read_text()
    assert "## Fit warnings" not in quiet

    evaluation.simulators["linear"].fit_warnings_ = ["lam chose the edge of its grid"]
    text = write_report(evaluation, runset, tmp_path / "warned").read_text()
    assert "## Fit warnings" in text and "- **linear**: lam chose the edge of its grid" in text
