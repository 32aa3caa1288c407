"""Fact tracing on a ``facts`` run set (FTRACE / TrackStar protocol): which method finds the teaching documents?

For every query fact, each method scores every fine-tuning document (an (n_documents, n_queries) matrix,
higher = more likely a proponent), the scores become a ranking, and the ranking is judged against the
corpus's gold labels (documents stating the query's exact triple):

- ``bm25``: lexical retrieval (``bm25s``, Lucene BM25) of the query's full statement (prompt + target) among
  the document texts: the baseline FTRACE and TrackStar find hard to beat at *attribution*;
- any method of the registry (:data:`simfluence.methods.METHODS`), by the same name as everywhere else:
  - the gradient methods score from the saved checkpoints of one run: ``tracin`` (TracIn-CP gradient dot
    products, learning-rate weighted over the checkpoints), ``tracin_cos`` (gradient cosines), ``trackstar``
    (Adam second-moment correction, random projection, mixed task-specific Hessian, unit norm, at the final
    checkpoint) and its ablations ``trackstar_no_opt``, ``trackstar_no_hessian``, ``trackstar_train_hessian``,
    ``trackstar_no_unit``;
  - a learned simulator (``linear_mom``, ``linear``, ...) is fitted on the run set's runs; a document's score
    for a query is its leave-one-out effect on the query's *final* loss
    (:func:`~simfluence.counterfactual.loo_effects`), **averaged over the runs whose curriculum contains it**
    (each run trains on a random half of the documents, so one base run would leave half the documents
    unscored); a document in no run scores ``-inf``.

Metrics (:mod:`simfluence.metrics.retrieval`), per query, then averaged overall and per frequency bucket:
``mrr`` (reciprocal rank of the first gold document), ``recall@10`` (TrackStar's hit rate: at least one gold
document in the top 10), ``strict_recall@10`` and ``precision@10`` (FTRACE's: the fraction of the gold
documents in the top 10; the fraction of the top 10 that is gold). Ties are broken by document position (lower
first), so results are deterministic. The ``candidates`` setting is FTRACE's reranking variant: each query
ranks only gold + BM25 top-100 + same-object documents + random documents.

**Tail-patch** (the *influence* side, TrackStar): from the pretrained base, one AdamW step (fresh optimizer
state, so the step is ``lr * g / (|g| + eps)``, at the runs' peak learning rate) on a single document, and
the change in the probability of the query's target; a method's tail-patch score is the mean change over
its top-10 proponents. It is computed for every (document, query) pair at once, so any method's top 10 is
a gather.

The journey: run set + corpus (``workloads.facts``) --attribution / counterfactual--> score matrices
--here--> per-query metrics --> one table (``run_factbench``) --> markdown (``format_factbench``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from simfluence.errors import SimfluenceError
from simfluence.metrics import rank_positions, retrieval_metrics, top_k_mean
from simfluence.runlog import RunSet

__all__ = ["DEFAULT_METHODS", "bm25_scores", "candidate_mask", "format_factbench", "gold_matrix",
           "method_scores", "rank_positions", "retrieval_metrics", "run_factbench", "simfluence_scores",
           "tail_patch_deltas"]

BASELINES = ("bm25",)  # retrieval baselines of this benchmark; every other method comes from the registry
DEFAULT_METHODS = ("bm25", "tracin", "tracin_cos", "trackstar", "linear_mom")
METRICS = ("mrr", "recall@10", "strict_recall@10", "precision@10")


# --------------------------------------------------------------------------------------------- gold labels
def gold_matrix(corpus: dict, label: str = "gold") -> np.ndarray:
    """(n_docs, n_queries) bool: document i carries ``label`` (``gold``, ``same_object``, ...) for query m."""
    queries = corpus["queries"]
    matrix = np.zeros((len(corpus["documents"]), len(queries)), dtype=bool)
    rows = np.concatenate([np.asarray(q[label], dtype=np.int64) for q in queries])
    cols = np.repeat(np.arange(len(queries)), [len(q[label]) for q in queries])
    matrix[rows, cols] = True
    return matrix


def candidate_mask(corpus: dict, bm25: np.ndarray, n_bm25: int = 100, n_random: int = 100,
                   seed: int = 0) -> np.ndarray:
    """FTRACE's reranking candidates: gold + BM25 top-``n_bm25`` + same-object documents + ``n_random`` random."""
    n_docs, n_queries = bm25.shape
    mask = gold_matrix(corpus) | gold_matrix(corpus, "same_object")
    mask |= rank_positions(bm25) <= n_bm25
    rng = np.random.default_rng([seed, 11])
    random_rank = rng.random((n_docs, n_queries)).argsort(axis=0).argsort(axis=0)
    return mask | (random_rank < n_random)


# --------------------------------------------------------------------------------------------- scores
def query_statements(corpus: dict) -> list[str]:
    """The full statement of each query fact, ``prompt + " " + target`` (what BM25 retrieves with)."""
    return [f"{q['prompt']} {q['target']}" for q in corpus["queries"]]


def bm25_scores(documents: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """(n_docs, n_queries) BM25 scores (``bm25s``, Lucene variant, English stop words removed)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(documents), stopwords="en", show_progress=False), show_progress=False)
    vocabulary = retriever.vocab_dict
    tokenized = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
    columns = [retriever.get_scores([token for token in tokens if token in vocabulary]) for tokens in tokenized]
    return np.stack(columns, axis=1).astype(np.float64) if columns else np.zeros((len(documents), 0))


def simfluence_scores(runset: RunSet, method: str = "linear_mom", runs: Sequence[int] | None = None,
                      simulator=None) -> np.ndarray:
    """(n_docs, n_queries) leave-one-out effect on the final query loss, averaged over the runs containing each doc.

    The simulator (``method``, fitted on all runs unless ``simulator`` is given) is asked, along each run's
    curriculum, how much each present document lowered each query's final loss; a document's score is the
    mean over the runs that contain it (``-inf`` if none does).
    """
    from simfluence.counterfactual import loo_effects
    from simfluence.methods import make_simulator

    if simulator is None:
        simulator = make_simulator(method).fit(runset)
    total = np.zeros((runset.n_pool, runset.n_test))
    count = np.zeros(runset.n_pool)
    for index in range(len(runset)) if runs is None else runs:
        effects = loo_effects(simulator, runset[index])
        total[effects.present] += effects.effects[effects.present]
        count += effects.present
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count[:, None] > 0, total / count[:, None], -np.inf)


def _check_method(method: str) -> None:
    from simfluence.methods import METHODS

    if method not in BASELINES and (method not in METHODS or "scores" in METHODS[method].needs):
        known = ", ".join([*BASELINES, *(name for name, entry in METHODS.items() if "scores" not in entry.needs)])
        raise SimfluenceError(f"unknown fact-tracing method {method!r}; choose from {known}")


def method_scores(method: str, runset: RunSet, corpus: dict, run: int = 0, projection_dim: int = 1024,
                  seed: int = 0, task=None) -> np.ndarray:
    """(n_docs, n_queries) scores of one method (see the module docstring for the methods)."""
    from simfluence.methods import METHODS

    _check_method(method)
    if method == "bm25":
        return bm25_scores([doc["text"] for doc in corpus["documents"]], query_statements(corpus))
    entry = METHODS[method]
    if "task" not in entry.needs:
        return simfluence_scores(runset, method)
    simulator = entry.build()
    options = simulator.get_params()
    if "time_varying" in options:  # TracIn-CP: one learning-rate-weighted matrix over the checkpoints
        simulator.set_params(time_varying=False)
    if "projection_dim" in options:  # large chunks: the projection is regenerated page by page for every chunk
        simulator.set_params(projection_dim=projection_dim, seed=seed, chunk_size=256)
    scores, _ = simulator.compute_scores(runset, run, task=task)
    return scores[-1]


# --------------------------------------------------------------------------------------------- tail-patch
def tail_patch_deltas(task, lr: float, eps: float = 1e-8, chunk_size: int = 64) -> np.ndarray:
    """(n_docs, n_queries) change in each query's target probability after one AdamW step on one document.

    From the task's pretrained base, a fresh AdamW's first step on document i is ``-lr * g_i / (|g_i| + eps)``
    (weight decay 0, as in fine-tuning); the target probability is ``exp(-loss)`` (the mean NLL of the
    target token(s)).
    """
    from torch.func import functional_call

    from simfluence.attribution.gradients import iter_per_example_gradients, select_parameters

    model = task.make_model(0).eval()
    selection = select_parameters(model)
    base = {name: param.detach() for name, param in model.named_parameters()}
    flat_base = selection.flatten(base).to(torch.float32)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        before = torch.exp(-task.loss_fn(model(task.test_inputs), task.test_targets))
    deltas = np.empty((len(task.pool_inputs), len(task.test_inputs)))
    for start, grads in iter_per_example_gradients(model, task.loss_fn, task.pool_inputs, task.pool_targets,
                                                   None, chunk_size, torch.float32):
        stepped = flat_base - lr * grads / (grads.abs() + eps)
        with torch.no_grad():
            for offset, flat in enumerate(stepped):
                params = selection.unflatten(flat)
                logits = functional_call(model, {**params, **buffers}, (task.test_inputs,))
                after = torch.exp(-task.loss_fn(logits, task.test_targets))
                deltas[start + offset] = (after - before).double().numpy()
    return deltas


# --------------------------------------------------------------------------------------------- the benchmark
def run_factbench(
    runset: RunSet,
    methods: Sequence[str] = DEFAULT_METHODS,
    run: int = 0,
    k: int = 10,
    candidates: bool = True,
    tail_patch: bool = True,
    tail_patch_lr: float | None = None,
    projection_dim: int = 1024,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
    task=None,
) -> pd.DataFrame:
    """Score every method on every query and tabulate the retrieval metrics overall and per frequency bucket.

    Parameters
    ----------
    runset : a ``facts`` run set loaded from disk (its folder holds the corpus; gradient methods need
        checkpoints of run ``run``).
    methods : ``bm25`` or names of :data:`simfluence.methods.METHODS`.
    run : the run whose checkpoints the gradient methods use.
    k : the cut-off of recall / precision.
    candidates : also report FTRACE's candidate-set reranking (setting ``candidates``).
    tail_patch : also report the tail-patch score of each method's top ``k``.
    tail_patch_lr : learning rate of the tail-patch step (default: the runs' peak learning rate).
    projection_dim : TrackStar's projection dimension.
    seed : seed of the projection and of the random candidates.
    echo : progress messages (e.g. ``click.echo``).
    task : the run set's :class:`~simfluence.task.Task` (or ``"file.py:function"``); default: rebuilt from
        the facts run set.

    Returns
    -------
    DataFrame ``setting, method, bucket, n_queries, mrr, recall@k, strict_recall@k, precision@k
    [, tail_patch], seconds`` with ``setting`` in ``full`` / ``candidates`` and ``bucket`` in ``all``, ``1``,
    ``2``, ``4``, ``8``; ``seconds`` is the time to score the method.
    """
    from simfluence.methods import METHODS
    from simfluence.workloads import task_for_runset
    from simfluence.workloads.facts import load_corpus

    for method in methods:
        _check_method(method)
    say = echo or (lambda _message: None)
    corpus = load_corpus(runset)
    if len(corpus["documents"]) != runset.n_pool or len(corpus["queries"]) != runset.n_test:
        raise SimfluenceError(f"the corpus of run set {str(runset.path)!r} does not match its pool / test sizes")
    gold = gold_matrix(corpus)
    buckets = np.array([q["frequency"] for q in corpus["queries"]])
    if tail_patch or any(method in METHODS and "task" in METHODS[method].needs for method in methods):
        task = task_for_runset(runset, task)

    bm25 = method_scores("bm25", runset, corpus)
    settings = {"full": None}
    if candidates:
        settings["candidates"] = candidate_mask(corpus, bm25, seed=seed)
    deltas = None
    if tail_patch:
        lr = tail_patch_lr if tail_patch_lr is not None else float(runset.metadata["lr_schedule"]["peak"])
        started = time.perf_counter()
        deltas = tail_patch_deltas(task, lr)
        say(f"tail-patch deltas for {deltas.shape[0]} documents in {time.perf_counter() - started:.1f}s")

    tables: dict[str, list[pd.DataFrame]] = {setting: [] for setting in settings}
    counts = {"all": len(buckets), **{str(b): int((buckets == b).sum()) for b in np.unique(buckets)}}
    for method in methods:
        started = time.perf_counter()
        scores = bm25 if method == "bm25" else method_scores(method, runset, corpus, run=run,
                                                             projection_dim=projection_dim, seed=seed, task=task)
        seconds = time.perf_counter() - started
        say(f"{method}: scored in {seconds:.1f}s")
        for setting, mask in settings.items():
            per_query = pd.DataFrame(retrieval_metrics(scores, gold, k, mask))
            if deltas is not None:
                ranked = scores if mask is None else np.where(mask, scores, -np.inf)
                per_query["tail_patch"] = top_k_mean(ranked, deltas, k)
            by_bucket = per_query.groupby(buckets).mean()
            table = pd.concat([per_query.mean().to_frame().T, by_bucket])
            table.insert(0, "bucket", ["all", *by_bucket.index.astype(str)])
            table.insert(0, "method", method)
            table.insert(0, "setting", setting)
            table.insert(3, "n_queries", table["bucket"].map(counts).to_numpy())
            table["seconds"] = seconds
            tables[setting].append(table)
    return pd.concat([table for setting in settings for table in tables[setting]], ignore_index=True)


def format_factbench(frame: pd.DataFrame, digits: int = 3) -> str:
    """Markdown tables of a :func:`run_factbench` frame: one per setting, a row per method and bucket."""
    columns = [c for c in frame.columns if c != "setting"]
    parts = []
    for setting, block in frame.groupby("setting", sort=False):
        lines = [f"**{setting}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in block[columns].itertuples(index=False):
            cells = [_cell(name, value, digits) for name, value in zip(columns, row, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _cell(name: str, value, digits: int) -> str:
    if not isinstance(value, float):
        return str(value)
    if name == "tail_patch":
        return f"{value:+.2e}"
    return f"{value:.1f}" if name == "seconds" else f"{value:.{digits}f}"
