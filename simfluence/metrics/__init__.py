"""Metrics: every number the library scores a simulator or an attribution method with.

- :mod:`~simfluence.metrics.trajectory`: simulated against real loss curves on held-out runs
  (``trajectory_metrics``, ``bootstrap_intervals``, ``spearman``) and their tables;
- :mod:`~simfluence.metrics.lds`: the linear datamodeling score of predicted against really retrained
  counterfactual changes (``lds_scores``), with its bootstrap interval, sign agreement and magnitude ratio;
- :mod:`~simfluence.metrics.retrieval`: rankings of training documents against gold labels (MRR, recall@k,
  precision@k) and the tail-patch score of a top k.

Metrics take arrays and return numbers: they never fit, simulate or retrain anything.
"""
from __future__ import annotations

from simfluence.metrics.lds import (
    lds_bootstrap_interval,
    lds_scores,
    magnitude_ratio,
    mean_lds,
    per_test_rho,
    sign_agreement,
)
from simfluence.metrics.retrieval import rank_positions, retrieval_metrics, top_k_mean
from simfluence.metrics.trajectory import (
    METRIC_NAMES,
    bootstrap_intervals,
    format_markdown_table,
    format_table,
    spearman,
    trajectory_metrics,
)

__all__ = ["METRIC_NAMES", "bootstrap_intervals", "format_markdown_table", "format_table", "lds_bootstrap_interval",
           "lds_scores", "magnitude_ratio", "mean_lds", "per_test_rho", "rank_positions", "retrieval_metrics",
           "sign_agreement", "spearman", "top_k_mean", "trajectory_metrics"]
