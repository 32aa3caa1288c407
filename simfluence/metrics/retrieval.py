"""Retrieval metrics: does a ranking of training documents put the ones that taught a fact first?

A method scores every document for every query (an (n_docs, n_queries) matrix, higher = more likely a
proponent); :func:`rank_positions` turns the scores into ranks (ties to the lower document position, so results
are deterministic) and :func:`retrieval_metrics` judges them against gold labels per query: ``mrr``
(reciprocal rank of the first gold document), ``recall@k`` (TrackStar's hit rate: at least one gold document in
the top k), ``strict_recall@k`` and ``precision@k`` (FTRACE's: the fraction of the gold documents in the top k;
the fraction of the top k that is gold). :func:`top_k_mean` is the tail-patch score (TrackStar): the mean of a
per-(document, query) value, such as the change of the query's target probability after one step on the
document, over each query's top-k documents. The fact-tracing benchmark that computes them is
:mod:`simfluence.apps.factbench`.
"""
from __future__ import annotations

import numpy as np

from simfluence.errors import SimfluenceError


def rank_positions(scores: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """(n_docs, n_queries) 1-based rank of every document for every query (1 = highest score).

    Ties go to the lower document position; NaN scores and, with a ``candidates`` mask, non-candidates rank
    after every real score (their ranks are still filled in, in position order).
    """
    keyed = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64))
    if candidates is not None:
        keyed = np.where(candidates, keyed, -np.inf)
    order = np.argsort(-keyed, axis=0, kind="stable")  # stable: ties keep position order; -inf sorts last
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, keyed.shape[0] + 1)[:, None], axis=0)
    return ranks


def retrieval_metrics(scores: np.ndarray, gold: np.ndarray, k: int = 10,
                      candidates: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-query MRR term, hit rate, strict recall and precision at ``k``.

    Parameters
    ----------
    scores : (n_docs, n_queries) higher = ranked first.
    gold : (n_docs, n_queries) bool, the documents stating each query's fact (every query needs one).
    k : cut-off.
    candidates : optional (n_docs, n_queries) bool, the documents each query may rank (others rank last).

    Returns
    -------
    ``{"mrr", "recall@k", "strict_recall@k", "precision@k"}`` each (n_queries,) float64.
    """
    gold = np.asarray(gold, dtype=bool)
    if gold.shape != np.shape(scores):
        raise SimfluenceError(f"scores {np.shape(scores)} and gold {gold.shape} differ in shape")
    n_gold = gold.sum(axis=0)
    if (n_gold == 0).any():
        raise SimfluenceError(f"query {int(np.argmax(n_gold == 0))} has no gold document")
    ranks = rank_positions(scores, candidates)
    first = np.where(gold, ranks, ranks.shape[0] + 1).min(axis=0)
    retrieved = (gold & (ranks <= k)).sum(axis=0)
    return {"mrr": 1.0 / first, f"recall@{k}": (retrieved > 0).astype(np.float64),
            f"strict_recall@{k}": retrieved / n_gold, f"precision@{k}": retrieved / k}


def top_k_mean(scores: np.ndarray, values: np.ndarray, k: int = 10) -> np.ndarray:
    """(n_queries,) mean of ``values`` over each query's top-``k`` documents by ``scores``.

    Parameters
    ----------
    scores : (n_docs, n_queries) higher = ranked first (ranked by :func:`rank_positions`).
    values : (n_docs, n_queries) the value of each (document, query) pair, e.g. tail-patch deltas.
    k : cut-off.
    """
    top = rank_positions(scores) <= k
    return (values * top).sum(axis=0) / top.sum(axis=0)
