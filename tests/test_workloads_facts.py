"""The facts workload: a deterministic fact world with correct labels, a padding-proof LM loss, real learning."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.workloads import TASK_FROM_RUNSET, WORKLOADS, task_from_runset
from simfluence.workloads.facts import (
    CORPUS_FILE,
    RELATIONS,
    TIERS,
    build_corpus,
    facts_task,
    generate_facts,
    load_corpus,
)
from simfluence.workloads.tinylm import IGNORE, PAD, token_nll

MINI = TIERS["mini"]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(MINI, data_seed=3)


@pytest.fixture(scope="module")
def runset(tmp_path_factory):
    return generate_facts(tmp_path_factory.mktemp("facts") / "rs", tier="mini", workers=1, progress=False)


def _states(text: str, fact: dict) -> bool:
    """Whether ``text`` holds a sentence stating ``fact`` with one of its relation's training templates."""
    sentences = [sentence.strip() + " ." for sentence in text.split(" .") if sentence.strip()]
    stated = {template.format(s=fact["subject"], o=fact["object"]) for template in RELATIONS[fact["relation"]][0]}
    return any(sentence in stated for sentence in sentences)


def test_corpus_is_deterministic_for_a_seed_and_differs_across_seeds(corpus):
    assert json.dumps(build_corpus(MINI, data_seed=3)) == json.dumps(corpus)
    assert build_corpus(MINI, data_seed=4)["documents"] != corpus["documents"]


def test_corpus_has_frequency_buckets_and_one_query_per_target_fact(corpus):
    targets = [fact for fact in corpus["facts"] if fact["kind"] == "target"]
    assert len(corpus["queries"]) == len(targets) == MINI.n_people * len(RELATIONS)
    assert {fact["frequency"] for fact in targets} == {1, 2, 4, 8}
    for query in corpus["queries"]:
        assert len(query["gold"]) == corpus["facts"][query["fact"]]["frequency"]
    assert any(doc["kind"] == "distractor" for doc in corpus["documents"])
    assert all(1 <= len(doc["facts"]) <= 3 for doc in corpus["documents"])


def test_gold_documents_state_the_exact_triple_and_no_other_document_does(corpus):
    for query in corpus["queries"]:
        fact = corpus["facts"][query["fact"]]
        assert query["prompt"] == query["template"].format(s=fact["subject"]) and query["target"] == fact["object"]
        gold = set(query["gold"])
        for doc in corpus["documents"]:
            assert _states(doc["text"], fact) == (doc["id"] in gold), (query["id"], doc["text"])


def test_partial_labels_share_their_part_of_the_triple_and_exclude_gold(corpus):
    for query in corpus["queries"]:
        fact = corpus["facts"][query["fact"]]
        for key in ("subject", "relation", "object"):
            labelled = query[f"same_{key}"]
            assert not set(labelled) & set(query["gold"])
            for doc_id in labelled:
                doc = corpus["documents"][doc_id]
                assert any(corpus["facts"][f][key] == fact[key] for f in doc["facts"])
    assert any(query["same_object"] for query in corpus["queries"])


def test_held_out_query_templates_never_appear_in_training_documents(corpus):
    texts = [doc["text"] for doc in corpus["documents"]]
    for _, query_templates in RELATIONS.values():
        for template in query_templates:
            pattern = re.compile(re.escape(template).replace(re.escape("{s}"), r"\S+ \S+"))
            assert not any(pattern.search(text) for text in texts), template
    for query in corpus["queries"]:
        assert not any(query["prompt"] in text for text in texts)


def test_every_word_is_in_the_vocabulary(corpus):
    vocabulary = set(corpus["vocabulary"])
    assert len(vocabulary) == len(corpus["vocabulary"])
    words = {word for doc in corpus["documents"] for word in doc["text"].split()}
    words |= {word for query in corpus["queries"] for word in f"{query['prompt']} {query['target']}".split()}
    assert words <= vocabulary


def test_per_example_losses_do_not_depend_on_the_batch_or_the_padding():
    task = facts_task("mini", data_seed=1)
    torch.manual_seed(0)
    model = task.make_model(0).eval()
    for inputs, targets in ((task.pool_inputs, task.pool_targets), (task.test_inputs, task.test_targets)):
        with torch.no_grad():
            batched = token_nll(model(inputs[:12]), targets[:12])
            single = torch.cat([token_nll(model(inputs[i:i + 1]), targets[i:i + 1]) for i in range(12)])
            extra = model.config.max_len - inputs.shape[1]  # pad as far as the position embeddings reach
            padded = token_nll(model(torch.nn.functional.pad(inputs[:12], (0, extra), value=PAD)),
                               torch.nn.functional.pad(targets[:12], (0, extra), value=IGNORE))
        assert extra >= 1
        assert torch.allclose(batched, single, atol=1e-5, rtol=1e-5)
        assert torch.allclose(batched, padded, atol=1e-5, rtol=1e-5)
    assert ((task.test_targets != IGNORE).sum(dim=1) == 1).all()  # a query scores its object token only


def test_make_model_returns_the_same_pretrained_base_for_any_seed():
    task = facts_task("mini", data_seed=1)
    first, second = task.make_model(0), task.make_model(7)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():  # pretrained: it predicts documents far better than a uniform guess
        pool_loss = token_nll(first(task.pool_inputs), task.pool_targets).mean().item()
    assert pool_loss < np.log(len(task.metadata["corpus"]["vocabulary"])) - 0.5


def test_mini_runset_records_corpus_base_and_complete_runs(runset):
    assert runset.metadata["workload"] == "facts" and runset.metadata["tier"] == "mini"
    assert len(runset.run_names) == MINI.n_runs and all(run.complete for run in runset)
    assert (runset.path / "base.pt").is_file() and (runset.path / CORPUS_FILE).is_file()
    corpus = load_corpus(runset)
    assert "corpus" not in runset.metadata
    assert (len(corpus["documents"]), len(corpus["queries"])) == (runset.n_pool, runset.n_test)
    assert np.allclose(runset[0].losses[0], runset[1].losses[0])  # every run starts from the base
    assert generate_facts is WORKLOADS["facts"] and TASK_FROM_RUNSET["facts"] is not None


def test_fine_tuning_teaches_the_facts_in_the_curriculum(runset):
    queries = load_corpus(runset)["queries"]
    changes_in, changes_out = [], []
    for run in runset:
        seen = set(run.curriculum.ids.tolist())
        in_curriculum = np.array([bool(seen & set(query["gold"])) for query in queries])
        change = run.losses[-1] - run.losses[0]
        changes_in.append(change[in_curriculum].mean())
        changes_out.append(change[~in_curriculum].mean())
    assert np.mean(changes_in) < 0
    assert np.mean(changes_in) < np.mean(changes_out)


def test_task_from_runset_reproduces_the_logged_losses(runset):
    task = task_from_runset(runset)
    assert task.n_pool == runset.n_pool and task.metadata["batch_size"] == MINI.batch_size
    torch.manual_seed(0)
    model = task.make_model(0).eval()
    with torch.no_grad():
        initial = token_nll(model(task.test_inputs), task.test_targets).double().numpy()
    assert np.allclose(initial, runset[0].losses[0], rtol=0, atol=1e-6)


def test_task_from_runset_rejects_a_changed_corpus(runset, tmp_path):
    manifest = json.loads((runset.path / "manifest.json").read_text())
    manifest["metadata"]["data_seed"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "runs").mkdir()
    with pytest.raises(SimfluenceError, match="corpus_sha256"):
        task_from_runset(RunSet.load(tmp_path, validate=False))
