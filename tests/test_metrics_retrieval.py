"""Retrieval metrics, checked by hand: ranks with ties, MRR, recall / precision at k, candidates, top-k means."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.metrics import rank_positions, retrieval_metrics, top_k_mean


def _gold(n_docs: int, columns: list[list[int]]) -> np.ndarray:
    gold = np.zeros((n_docs, len(columns)), dtype=bool)
    for query, docs in enumerate(columns):
        gold[docs, query] = True
    return gold


def test_ranks_break_ties_by_document_position_and_put_nan_last():
    scores = np.array([[0.1], [0.9], [0.5], [0.5], [np.nan]])
    assert rank_positions(scores)[:, 0].tolist() == [4, 1, 2, 3, 5]


def test_metrics_match_hand_computed_values_at_10():
    scores = np.repeat(-np.arange(12.0)[:, None], 2, axis=1)  # document i is ranked i + 1 for both queries
    gold = _gold(12, [[3, 10], [10, 11]])
    metrics = retrieval_metrics(scores, gold, k=10)
    assert np.allclose(metrics["mrr"], [1 / 4, 1 / 11])
    assert np.allclose(metrics["recall@10"], [1.0, 0.0])  # hit rate: one gold document in the top 10 suffices
    assert np.allclose(metrics["strict_recall@10"], [0.5, 0.0])  # fraction of the gold documents retrieved
    assert np.allclose(metrics["precision@10"], [0.1, 0.0])  # fraction of the top 10 that is gold


def test_metrics_with_ties_are_deterministic_and_candidates_rerank():
    scores = np.array([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])
    gold = _gold(5, [[2, 3], [0]])
    metrics = retrieval_metrics(scores, gold, k=2)
    assert np.allclose(metrics["mrr"], [0.5, 0.5])  # doc 2 beats doc 3 on the tie; doc 0 the zeros
    assert np.allclose(metrics["recall@2"], [1.0, 1.0])
    assert np.allclose(metrics["strict_recall@2"], [0.5, 1.0])
    assert np.allclose(metrics["precision@2"], [0.5, 0.5])
    candidates = np.ones_like(gold)
    candidates[1, 0] = candidates[4, 1] = False  # drop each query's top non-gold document
    reranked = retrieval_metrics(scores, gold, k=2, candidates=candidates)
    assert np.allclose(reranked["mrr"], [1.0, 1.0])
    assert np.allclose(reranked["strict_recall@2"], [1.0, 1.0])


def test_metrics_reject_a_query_without_gold():
    with pytest.raises(SimfluenceError, match="no gold"):
        retrieval_metrics(np.zeros((3, 1)), np.zeros((3, 1), dtype=bool))


def test_top_k_mean_averages_the_values_of_each_querys_top_documents():
    scores = np.array([[0.9, 0.0], [0.5, 0.5], [0.5, 1.0], [0.1, np.nan]])  # ties to the lower position
    values = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [8.0, 80.0]])
    assert top_k_mean(scores, values, k=2).tolist() == [1.5, 30.0]
    assert top_k_mean(scores, values, k=1).tolist() == [1.0, 40.0]
