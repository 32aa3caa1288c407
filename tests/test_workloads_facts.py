"""The facts workload: a deterministic fact world with correct labels, a padding-proof LM loss, real learning.

The corpus tests run on both worlds (``simple`` and ``hard``); the hard world's own claims (shared names,
aliases, decoys, recorded and rebuilt) follow them.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import replace

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
    corpus_sha256,
    facts_task,
    generate_facts,
    load_corpus,
)
from simfluence.workloads.tinylm import IGNORE, PAD, token_nll

MINI = TIERS["mini"]


@functools.cache
def _mini_corpus(world: str) -> dict:
    return build_corpus(replace(MINI, world=world), data_seed=3)


@pytest.fixture(scope="module", params=["simple", "hard"])
def corpus(request):
    return _mini_corpus(request.param)


@pytest.fixture(scope="module")
def hard_corpus():
    return _mini_corpus("hard")


@pytest.fixture(scope="module")
def runset(tmp_path_factory):
    return generate_facts(tmp_path_factory.mktemp("facts") / "rs", tier="mini", workers=1, progress=False)


def _sentences(text: str) -> list[str]:
    return [sentence.strip() + " ." for sentence in text.split(" .") if sentence.strip()]


def _states(text: str, fact: dict, corpus: dict, names: tuple[str, ...] | None = None) -> bool:
    """Whether ``text`` holds a sentence stating ``fact`` with a training template of the corpus, naming the
    subject in full or by alias (or by one of ``names``)."""
    if names is None:
        names = (fact["subject"], *([corpus["aliases"][fact["subject"]]] if "aliases" in corpus else []))
    templates = corpus["relations"][fact["relation"]]["train_templates"]
    stated = {template.format(s=name, o=fact["object"]) for template in templates for name in names}
    return any(sentence in stated for sentence in _sentences(text))


def test_corpus_is_deterministic_for_a_seed_and_differs_across_seeds(corpus):
    settings = replace(MINI, world=corpus.get("world", "simple"))
    assert json.dumps(build_corpus(settings, data_seed=3)) == json.dumps(corpus)
    assert build_corpus(settings, data_seed=4)["documents"] != corpus["documents"]


def test_the_simple_world_is_the_one_recorded_before_worlds_existed():
    assert corpus_sha256(build_corpus(MINI, 0)) == "ed3e20dd882b2b25cabf91b6b973fc43fe48df7dee01b0f3601bfd761cc16669"
    assert corpus_sha256(build_corpus(TIERS["default"], 0)) == (
        "2f988739a66ba961243579457d226deea96a6bc02cea509f426d362c03f03b32")
    assert "world" not in facts_task("mini").metadata["settings"]  # old run sets' metadata and base caches match


def test_corpus_has_frequency_buckets_and_one_query_per_target_fact(corpus):
    targets = [fact for fact in corpus["facts"] if fact["kind"] == "target"]
    assert len(corpus["queries"]) == len(targets) == MINI.n_people * len(RELATIONS)
    assert {fact["frequency"] for fact in targets} == {1, 2, 4, 8}
    for query in corpus["queries"]:
        assert len(query["gold"]) == corpus["facts"][query["fact"]]["frequency"]
    assert any(doc["kind"] == "distractor" for doc in corpus["documents"])
    for doc in corpus["documents"]:  # 1-3 sentences; the hard world's decoy and alias sentences state no fact
        assert 1 <= len(_sentences(doc["text"])) <= 3
        assert len(doc["facts"]) == len(_sentences(doc["text"])) or ("world" in corpus and len(doc["facts"]) <= 3)


def test_gold_documents_state_the_exact_triple_and_no_other_document_does(corpus):
    for query in corpus["queries"]:
        fact = corpus["facts"][query["fact"]]
        assert query["prompt"] == query["template"].format(s=fact["subject"]) and query["target"] == fact["object"]
        gold = set(query["gold"])
        for doc in corpus["documents"]:
            assert _states(doc["text"], fact, corpus) == (doc["id"] in gold), (query["id"], doc["text"])
            assert fact["object"] in doc["text"].split() or doc["id"] not in gold
        # answerable from the query's words: some gold document states the fact under the full name
        assert any(_states(corpus["documents"][i]["text"], fact, corpus, (fact["subject"],)) for i in gold)


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
            pattern = re.compile(re.escape(template).replace(re.escape("{s}"), r"\S+( \S+)?"))
            assert not any(pattern.search(text) for text in texts), template
    for query in corpus["queries"]:
        assert not any(query["prompt"] in text for text in texts)


def test_every_word_is_in_the_vocabulary(corpus):
    vocabulary = set(corpus["vocabulary"])
    assert len(vocabulary) == len(corpus["vocabulary"])
    words = {word for doc in corpus["documents"] for word in doc["text"].split()}
    words |= {word for query in corpus["queries"] for word in f"{query['prompt']} {query['target']}".split()}
    assert words <= vocabulary


def test_hard_world_people_share_first_and_last_names_but_not_full_names(hard_corpus):
    people = list(dict.fromkeys(fact["subject"] for fact in hard_corpus["facts"]))  # targets and distractors
    assert len(people) == MINI.n_people + MINI.n_distractor_people
    firsts, lasts = Counter(name.split()[0] for name in people), Counter(name.split()[1] for name in people)
    assert sum(firsts[name.split()[0]] > 1 for name in people) >= len(people) // 2
    assert sum(lasts[name.split()[1]] > 1 for name in people) >= len(people) // 2
    texts = [doc["text"] for doc in hard_corpus["documents"]]
    for first in (name for name, count in firsts.items() if count > 1):  # namesakes really share documents' words
        assert len({name for name in people if name.startswith(first + " ") and any(name in t for t in texts)}) > 1


def test_hard_world_aliases_are_introduced_and_name_people_in_gold_documents(hard_corpus):
    aliases = hard_corpus["aliases"]
    assert len(set(aliases.values())) == len(aliases)
    assert not set(aliases.values()) & {word for name in aliases for word in name.split()}
    texts = [doc["text"] for doc in hard_corpus["documents"]]
    people = {fact["subject"] for fact in hard_corpus["facts"]}
    for person in people:
        assert sum(f"{person} is also known as {aliases[person]} ." in text for text in texts) == 1
    by_alias = [query for query in hard_corpus["queries"] for i in query["gold"]
                if _states(texts[i], hard_corpus["facts"][query["fact"]], hard_corpus,
                           (aliases[hard_corpus["facts"][query["fact"]]["subject"]],))]
    assert by_alias and all(query["frequency"] > 1 for query in by_alias)  # a fact's first mention is in full


def test_hard_world_decoys_name_subject_and_object_in_documents_that_are_not_gold(hard_corpus):
    decoyed = 0
    for query in hard_corpus["queries"]:
        fact = hard_corpus["facts"][query["fact"]]
        decoys = [doc for doc in hard_corpus["documents"] if doc["id"] not in query["gold"]
                  and fact["subject"] in doc["text"] and fact["object"] in doc["text"].split()]
        decoyed += bool(decoys)
        assert not set(d["id"] for d in decoys) & set(query["gold"])
    assert decoyed >= len(hard_corpus["queries"]) // 3
    assert any(not doc["facts"] for doc in hard_corpus["documents"])  # decoys and aliases only


def test_hard_world_is_recorded_in_the_metadata_and_rebuilt_from_it(tmp_path):
    settings = replace(MINI, world="hard")
    task = facts_task(settings, data_seed=2)
    corpus = task.metadata.pop("corpus")
    assert task.metadata["settings"]["world"] == "hard" and task.metadata["tier"] == "custom"
    RunSet.create(tmp_path / "rs", n_pool=task.n_pool, test_ids=task.n_test, metadata=task.metadata)
    rebuilt = task_from_runset(RunSet.load(tmp_path / "rs", validate=False))
    assert rebuilt.metadata["corpus_sha256"] == corpus_sha256(corpus) == task.metadata["corpus_sha256"]
    assert torch.equal(rebuilt.pool_inputs, task.pool_inputs) and torch.equal(rebuilt.test_inputs, task.test_inputs)
    assert corpus_sha256(corpus) != corpus_sha256(build_corpus(MINI, data_seed=2))
    with pytest.raises(SimfluenceError, match="facts world"):
        build_corpus(replace(MINI, world="harder"))


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


# ------------------------------------------------------------------ the smooth recipe
def test_smooth_tier_fine_tunes_with_eps_inside_the_square_root_and_replays_exactly(tmp_path):
    from simfluence.attribution.unrolled import replay_losses
    from simfluence.optim import AdamW
    from simfluence.task import check_recorded_settings
    from simfluence.workloads.facts import SMOOTH

    runset = generate_facts(tmp_path / "smooth", tier="mini", smooth=True, n_runs=1, workers=1, progress=False)
    meta = runset.metadata
    assert meta["tier"] == "mini-smooth" and meta["settings"]["eps_root"] == SMOOTH["eps_root"]
    assert meta["optimizer"]["eps_root"] == SMOOTH["eps_root"]
    assert meta["batch_size"] == SMOOTH.get("batch_size", MINI.batch_size)
    task = task_from_runset(runset)
    optimizer = task.make_optimizer(task.make_model(0).parameters())
    assert type(optimizer) is AdamW and optimizer.param_groups[0]["eps_root"] == SMOOTH["eps_root"]
    check_recorded_settings(task, runset, runset[0])
    run = runset[0]
    replayed = replay_losses(task, run.curriculum, init_seed=0, seed=run.metadata["seed"], dtype=None)
    np.testing.assert_array_equal(replayed.astype(np.float32), run.losses)
    assert TIERS["default-smooth"] == replace(TIERS["default"], **SMOOTH)
