"""Fact tracing: BM25 finding exact copies, gold labels, the benchmark end to end on the mini tier.

The retrieval metrics themselves are checked by hand in test_metrics_retrieval.py.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from simfluence.apps.factbench import (
    DEFAULT_METHODS,
    bm25_scores,
    candidate_mask,
    format_factbench,
    gold_matrix,
    query_statements,
    run_factbench,
)
from simfluence.cli import main
from simfluence.errors import SimfluenceError
from simfluence.metrics import rank_positions, retrieval_metrics
from simfluence.workloads.facts import TIERS, build_corpus, generate_facts, load_corpus


@pytest.fixture(scope="module")
def mini_runset(tmp_path_factory):
    """A mini facts run set of 3 runs with checkpoints at their start and end.

    ``data_seed=1``: a world of its own, so its pretrained base is not the one other test modules expect to
    pretrain (and cache to disk) themselves; the base is memoised per process.
    """
    return generate_facts(tmp_path_factory.mktemp("factbench") / "rs", tier="mini", n_runs=3, workers=1,
                          checkpoint_steps=(0, 60), data_seed=1, progress=False)


def test_bm25_ranks_an_exact_copy_of_a_document_first(mini_runset):
    texts = [doc["text"] for doc in load_corpus(mini_runset)["documents"]]
    copied = [0, 17, 50, len(texts) - 1]
    ranks = rank_positions(bm25_scores(texts, [texts[i] for i in copied]))
    assert ranks[copied, np.arange(len(copied))].tolist() == [1] * len(copied)


def test_bm25_is_strong_but_not_perfect_on_the_hard_world():
    scores = {}
    for world in ("simple", "hard"):
        corpus = build_corpus(replace(TIERS["mini"], world=world), data_seed=0)
        bm25 = bm25_scores([doc["text"] for doc in corpus["documents"]], query_statements(corpus))
        metrics = retrieval_metrics(bm25, gold_matrix(corpus), 10)
        scores[world] = np.mean(metrics["mrr"]), np.mean(metrics["recall@10"])
    assert scores["simple"] == (1.0, 1.0)  # unique names: the query's name and object find exactly the gold
    assert 0.5 < scores["hard"][0] < 0.9 and scores["hard"][1] > 0.9  # decoys and namesakes rank above gold


def test_gold_matrix_and_candidates_follow_the_corpus_labels(mini_runset):
    corpus = load_corpus(mini_runset)
    gold = gold_matrix(corpus)
    assert gold.sum(axis=0).tolist() == [q["frequency"] for q in corpus["queries"]]
    texts = [doc["text"] for doc in corpus["documents"]]
    bm25 = bm25_scores(texts, [q["prompt"] for q in corpus["queries"]])
    mask = candidate_mask(corpus, bm25, n_bm25=5, n_random=3)
    assert (mask | ~gold).all() and (mask | ~gold_matrix(corpus, "same_object")).all()
    assert (mask.sum(axis=0) >= 8).all()


def test_run_factbench_reports_every_method_setting_and_bucket(mini_runset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: no vmap batching rule for CPU attention
        frame = run_factbench(mini_runset, methods=DEFAULT_METHODS, projection_dim=64)
    assert len(frame) == len(DEFAULT_METHODS) * 2 * 5
    for (setting, method), block in frame.groupby(["setting", "method"]):
        assert block["bucket"].tolist() == ["all", "1", "2", "4", "8"], (setting, method)
    assert set(frame["method"]) == set(DEFAULT_METHODS)
    assert set(frame["setting"]) == {"full", "candidates"}
    metrics = frame[["mrr", "recall@10", "strict_recall@10", "precision@10"]].to_numpy()
    assert np.isfinite(metrics).all() and (metrics >= 0).all() and (metrics <= 1).all()
    assert np.isfinite(frame["tail_patch"]).all()
    bm25 = frame[(frame["method"] == "bm25") & (frame["bucket"] == "all")]
    assert (bm25["mrr"] > 0.9).all()  # unique made-up names make lexical retrieval nearly perfect
    assert frame.loc[frame["bucket"] == "all", "n_queries"].eq(48).all()
    assert "| bm25 | all | 48 |" in format_factbench(frame)


def test_run_factbench_rejects_an_unknown_method(mini_runset):
    with pytest.raises(SimfluenceError, match="unknown fact-tracing method"):
        run_factbench(mini_runset, methods=["bm25", "oracle"])


def test_trace_command_prints_the_table_and_writes_json(mini_runset, tmp_path, capsys):
    out = tmp_path / "trace.json"
    code = main(["trace", str(mini_runset.path), "--methods", "bm25", "--no-tail-patch", "--json", str(out)])
    assert code == 0
    assert "| bm25 | all |" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert {record["setting"] for record in records} == {"full", "candidates"} and len(records) == 10
