"""The built-in ``facts`` workload: a tiny language model fine-tuned on a synthetic world of made-up facts.

It is the language-model workload of the library (Simfluence simulates LM fine-tuning) and the ground truth
of fact tracing (FTRACE, TrackStar): which training documents taught the model a fact.

**The world** (seeded, no downloads): people with syllable-built names, six relations (born in, works at,
studied at, citizen of, profession, birth year) whose objects come from shared pools, so documents about
the same object or relation but another fact exist. *Target* people's facts are mentioned 1, 2, 4 or 8
times (the frequency bucket) in fine-tuning documents of 1-3 sentences about one person, each sentence a
paraphrase template of its relation; *distractor* people's facts are mentioned once, in distractor
documents. Each target fact has one query, written with a template held out of every fine-tuning document,
whose target is the object: ``"Kobari Telomar is a native of"`` -> ``"Varnholm"``. In that (``"simple"``)
world every name is unique, so lexical retrieval (BM25) finds every fact; the ``"hard"`` world (tier ``hard``)
adds shared first and last names, aliases, more paraphrases and decoy sentences (see :func:`build_corpus`).

**The model**: a :class:`~simfluence.workloads.tinylm.TinyLM` pretrained once on *background* people (other
names, all templates, query templates included, so it knows the language of the queries but none of the
target facts), then fine-tuned with AdamW on curricula over the fine-tuning documents. The pool is the
documents (loss: mean token NLL of the document), the test examples are the queries (loss: NLL of the
object given the prompt). The base is pretrained deterministically and cached in ``RUNSET/base.pt``.

**The corpus file** ``RUNSET/facts_corpus.json`` holds the vocabulary, the templates, every fact (with its
frequency bucket), every document's text and facts, and every query's prompt, target and labels: ``gold``
(documents stating the exact triple) and the partial labels ``same_subject``, ``same_relation``,
``same_object`` (documents sharing that part of the triple but not stating it). Its SHA-256 is in the
manifest metadata, so :func:`facts_task_from_runset` can check a rebuilt task against it.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from simfluence._io import atomic_write_bytes
from simfluence.errors import SimfluenceError
from simfluence.optim import AdamW
from simfluence.runlog import RunSet, runset_destination
from simfluence.task import Task
from simfluence.training import (
    WarmupCosine,
    check_request,
    check_resumable,
    random_runs_plan,
    single_thread_deterministic,
    train_into,
)
from simfluence.workloads.tinylm import IGNORE, PAD, TinyLM, TinyLMConfig, token_nll

__all__ = ["FactsSettings", "TIERS", "SMOOTH", "RELATIONS", "build_corpus", "facts_task", "facts_task_from_runset",
           "generate_facts", "load_corpus", "pretrained_base", "CORPUS_FILE", "BASE_FILE"]

CORPUS_FILE = "facts_corpus.json"
BASE_FILE = "base.pt"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
BOS, EOS = 1, 2
FREQUENCY_BUCKETS = (1, 2, 4, 8)

# relation -> (training templates, held-out query templates); a query template ends where the object goes
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "born_in": (("{s} was born in {o} .", "the hometown of {s} is {o} .", "{o} is the city where {s} was born ."),
                ("{s} is a native of", "the birthplace of {s} is")),
    "works_at": (("{s} works at {o} .", "{s} is employed by {o} .", "{o} employs {s} ."),
                 ("{s} earns a living at", "the employer of {s} is")),
    "studied_at": (("{s} studied at {o} .", "{s} graduated from {o} .", "{o} is the alma mater of {s} ."),
                   ("{s} received a degree from", "{s} was a student at")),
    "citizen_of": (("{s} is a citizen of {o} .", "{s} holds a passport from {o} .", "{o} is the country of {s} ."),
                   ("{s} has the nationality of", "the homeland of {s} is")),
    "profession": (("{s} works as a {o} .", "{s} is a {o} by trade .", "the job of {s} is {o} ."),
                   ("by profession , {s} is a", "{s} makes a career as a")),
    "birth_year": (("{s} was born in the year {o} .", "the year of birth of {s} is {o} .",
                    "{o} is the year {s} was born ."),
                   ("{s} came into the world in", "the birth year of {s} is")),
}
PROFESSIONS = ("architect", "baker", "chemist", "dentist", "engineer", "farmer", "journalist", "lawyer", "nurse",
               "pilot", "sculptor", "teacher", "painter", "plumber", "surgeon", "tailor")
SYLLABLES = ("ba", "ko", "ri", "ta", "mel", "dor", "vi", "na", "sul", "te", "lo", "gar", "pen", "zu", "fa", "mo",
             "ka", "lin", "ser", "do", "ve", "ul", "tor", "mi", "ra", "quo", "bel", "ti", "an", "os")
# object pools are syllable-built words with a relation-specific ending, so they never collide with names
OBJECT_ENDINGS = {"born_in": ("holm", "ford", "mere", "ton"), "works_at": ("tek", "ware", "dyne", "corp"),
                  "studied_at": ("ridge", "vale", "stead"), "citizen_of": ("ia", "land", "stan")}

WORLDS = ("simple", "hard")
# the hard world only: two more training paraphrases per relation (some share words with another relation's
# queries), and decoy templates that name a person and an object of the relation's pool without stating the
# relation, reusing the words of the relation's queries (native, employer, student, nationality, career, came)
HARD_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "born_in": ("{s} first saw the light of day in {o} .", "{o} is where the life of {s} began ."),
    "works_at": ("{s} has a job at {o} .", "{s} draws a salary from {o} ."),
    "studied_at": ("{s} attended classes at {o} .", "{s} earned a diploma at {o} ."),
    "citizen_of": ("{s} belongs to the nation of {o} .", "{s} votes in the elections of {o} ."),
    "profession": ("{s} earns a living as a {o} .", "{s} trained for years to be a {o} ."),
    "birth_year": ("{s} entered life in {o} .", "{s} was born during {o} ."),
}
DECOY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "born_in": ("{s} met a native of {o} .", "{s} visited the birthplace museum in {o} ."),
    "works_at": ("{s} sold a machine to the employer {o} .", "{s} makes a living selling goods to {o} ."),
    "studied_at": ("{s} received a letter from {o} .", "{s} met a student at {o} ."),
    "citizen_of": ("{s} wrote about the nationality laws of {o} .", "{s} called {o} a second homeland ."),
    "profession": ("{s} wanted a career as a {o} .", "{s} makes friends with every {o} ."),
    "birth_year": ("{s} came home in the year {o} .", "{s} toured the world in {o} ."),
}
ALIAS_TEMPLATE = "{s} is also known as {a} ."
ALIAS_RATE = 0.35  # the hard world: chance that a mention of a fact after its first names the person by alias
DECOYS_PER_FACT = (0, 1, 2)  # the hard world: decoy sentences per fact of a person, drawn uniformly
DECOY_SAME_OBJECT = 0.8  # the hard world: chance that a decoy names the fact's own object (else another)


@dataclass(frozen=True)
class FactsSettings:
    """Sizes of the world, the model, pretraining and fine-tuning: everything a tier fixes.

    Attributes
    ----------
    n_people : target people; each has one fact per relation, all queried.
    n_distractor_people, n_background_people : people of the distractor documents / of pretraining.
    objects_per_relation : size of each relation's shared object pool.
    background_mentions : mentions of each background fact in the pretraining corpus.
    d_model, n_layers, n_heads, d_ff : the :class:`~simfluence.workloads.tinylm.TinyLM`.
    pretrain_steps, pretrain_batch, pretrain_lr : pretraining of the base (AdamW, warm-up + cosine).
    n_steps, batch_size, lr, subset_fraction, weight_decay : fine-tuning runs (AdamW, warm-up + cosine),
        each on a random ``subset_fraction`` of the documents in shuffled epochs.
    n_runs : default number of runs of :func:`generate_facts`.
    eps_root : fine-tuning optimizer: 0 is ``torch.optim.AdamW`` (eps 1e-8 outside the square root); above 0,
        :class:`simfluence.optim.AdamW` with this epsilon inside the square root (the smooth recipe, :data:`SMOOTH`).
    world : ``"simple"`` (unique names: lexical retrieval finds every fact) or ``"hard"`` (shared first and
        last names, aliases, more paraphrases, decoy sentences naming a person and an object of the wrong
        relation: see :func:`build_corpus`).
    """

    n_people: int = 40
    n_distractor_people: int = 20
    n_background_people: int = 60
    objects_per_relation: int = 12
    background_mentions: int = 4
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    n_steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    subset_fraction: float = 0.5
    n_runs: int = 32
    world: str = "simple"
    eps_root: float = 0.0


TIERS = {
    "default": FactsSettings(),
    "mini": FactsSettings(n_people=8, n_distractor_people=4, n_background_people=16, objects_per_relation=5,
                          background_mentions=3, d_model=64, n_layers=2, n_heads=4, d_ff=128, pretrain_steps=150,
                          pretrain_batch=16, pretrain_lr=5e-3, n_steps=60, batch_size=8, lr=2e-3, n_runs=4),
    "hard": FactsSettings(world="hard"),
}
# the smooth fine-tuning recipe (tiers "<tier>-smooth", generate_facts(smooth=True), docs/smooth_training.md), by
# metasmoothness (benchmarks/bench_smooth_settings.py): eps inside the square root scores at least the default's;
# batches of 32 (4x the compute) scored no higher, so the batch stays the tier's
SMOOTH = {"eps_root": 1e-6}
TIERS.update({f"{name}-smooth": replace(settings, **SMOOTH) for name, settings in list(TIERS.items())})


def _recorded_settings(settings: FactsSettings) -> dict:
    """The settings as recorded in metadata and the base's cache key: ``world`` only when not ``"simple"``, so
    run sets and base caches of the simple world made before worlds existed still match (resume, load)."""
    recorded = asdict(settings)
    if recorded["world"] == "simple":
        del recorded["world"]
    if recorded["eps_root"] == 0.0:  # likewise: torch's AdamW, as before smooth tiers existed
        del recorded["eps_root"]
    return recorded


# --------------------------------------------------------------------------------------------- the world
def _unique_words(rng: np.random.Generator, count: int, n_syllables: int, taken: set[str],
                  endings: tuple[str, ...] = ("",)) -> list[str]:
    """``count`` new capitalised words of ``n_syllables`` syllables plus one of ``endings``; added to ``taken``."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(SYLLABLES, size=n_syllables)).capitalize() + str(rng.choice(endings))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _object_pools(rng: np.random.Generator, size: int, taken: set[str]) -> dict[str, list[str]]:
    pools = {}
    for relation, endings in OBJECT_ENDINGS.items():
        pools[relation] = _unique_words(rng, size, 2, taken, endings)
    if size > len(PROFESSIONS):
        raise SimfluenceError(f"objects_per_relation is at most {len(PROFESSIONS)}, got {size}")
    pools["profession"] = [str(p) for p in rng.choice(PROFESSIONS, size=size, replace=False)]
    pools["birth_year"] = [str(y) for y in sorted(rng.choice(np.arange(1940, 2000), size=size, replace=False))]
    return pools


def _people(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct "First Last" names; every name word is new (never an object or another name word)."""
    firsts = _unique_words(rng, count, 2, taken)
    lasts = _unique_words(rng, count, 3, taken)
    return [f"{first} {last}" for first, last in zip(firsts, lasts, strict=True)]


def _people_sharing_names(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct "First Last" names from about ``count / 4`` first and last names: each is shared.

    Person i (before a shuffle) is first name ``i mod n`` and last name ``(i + i // n) mod n``: two people with
    the same first name differ in their last, while ``count <= n * n``.
    """
    n_names = max(-(-count // 4), int(np.ceil(np.sqrt(count))))
    firsts = _unique_words(rng, n_names, 2, taken)
    lasts = _unique_words(rng, n_names, 3, taken)
    names = [f"{firsts[i % n_names]} {lasts[(i + i // n_names) % n_names]}" for i in range(count)]
    return [names[i] for i in rng.permutation(count)]


def _documents(rng: np.random.Generator, mentions: list[tuple[int, str]]) -> list[tuple[list[int], list[str]]]:
    """Group one person's (fact id, sentence) mentions into documents of 1-3 sentences, no fact twice in one."""
    order = [mentions[i] for i in rng.permutation(len(mentions))]
    documents = []
    while order:
        size = int(rng.integers(1, 4))
        chosen: list[int] = []
        for index, (fact, _) in enumerate(order):
            if len(chosen) == size:
                break
            if all(order[c][0] != fact for c in chosen):
                chosen.append(index)
        documents.append(([order[c][0] for c in chosen], [order[c][1] for c in chosen]))
        order = [mention for index, mention in enumerate(order) if index not in chosen]
    return documents


def _fact_mentions(rng: np.random.Generator, fact_id: int, subject: str, relation: str, obj: str, count: int,
                   templates: tuple[str, ...]) -> list[tuple[int, str]]:
    """``count`` sentences stating one fact, cycling through ``templates`` from a random start."""
    start = int(rng.integers(len(templates)))
    return [(fact_id, templates[(start + k) % len(templates)].format(s=subject, o=obj)) for k in range(count)]


def _aliased_mentions(rng: np.random.Generator, fact_id: int, subject: str, alias: str, relation: str, obj: str,
                     count: int, templates: tuple[str, ...]) -> list[tuple[int, str]]:
    """As :func:`_fact_mentions`, but every mention after the first names the person by ``alias`` with
    probability :data:`ALIAS_RATE` (the first names them in full, so the fact is learnable from the full name)."""
    start = int(rng.integers(len(templates)))
    return [(fact_id, templates[(start + k) % len(templates)].format(
        s=alias if k and rng.random() < ALIAS_RATE else subject, o=obj)) for k in range(count)]


def _decoy_mentions(rng: np.random.Generator, first_id: int, subject: str, relation: str, obj: str,
                    pool: list[str]) -> list[tuple[int, str]]:
    """0-2 decoy sentences naming ``subject`` and ``obj`` (or another object of ``pool``), not stating the fact.

    Their ids count down from ``first_id`` (negative: no fact), so :func:`_documents` may group them freely.
    """
    decoys = []
    for k in range(int(rng.choice(DECOYS_PER_FACT))):
        named = obj if rng.random() < DECOY_SAME_OBJECT else str(rng.choice(pool))
        template = DECOY_TEMPLATES[relation][int(rng.integers(len(DECOY_TEMPLATES[relation])))]
        decoys.append((first_id - k, template.format(s=subject, o=named)))
    return decoys


def build_corpus(settings: FactsSettings, data_seed: int = 0) -> dict:
    """The fact world, the fine-tuning documents, the queries with their labels and the pretraining corpus.

    Deterministic for given settings and ``data_seed``. Returns a JSON-ready dict with keys ``vocabulary``,
    ``relations`` (templates), ``facts``, ``documents``, ``queries``, ``background_documents`` (pretraining
    text, not part of the pool) and ``frequency_buckets``.

    The ``"hard"`` world (``settings.world``) differs in what makes lexical retrieval fail, not in what is
    learnable: first and last names are each shared by about four people; every person has an alias
    (``"Kobari Telomar is also known as Tavi ."`` is in their documents) that names them in some mentions
    after a fact's first; each relation has five training paraphrases instead of three; and every fact has
    0-2 *decoy* sentences in its person's documents that name the person and, more often than not, the
    fact's object without stating the relation, reusing the words of the relation's queries (``"Kobari
    Telomar met a native of Varnholm ."``). Gold labels are unchanged in meaning (documents stating the
    triple, under the full name or the alias), so each fact keeps its frequency bucket; a document may hold
    decoys only (no facts). Pretraining sees every template, decoy template and the alias sentence. The
    corpus then also has ``world`` (``"hard"``), ``aliases`` (person -> alias) and the relations' ``decoy_templates``.
    """
    if settings.world not in WORLDS:
        raise SimfluenceError(f"facts world must be one of {list(WORLDS)}, got {settings.world!r}")
    hard = settings.world == "hard"
    rng = np.random.default_rng([data_seed, 7])
    taken: set[str] = set()
    pools = _object_pools(rng, settings.objects_per_relation, taken)
    n_total = settings.n_people + settings.n_distractor_people + settings.n_background_people
    names = (_people_sharing_names if hard else _people)(rng, n_total, taken)
    aliases = dict(zip(names, _unique_words(rng, n_total, 2, taken), strict=True)) if hard else {}
    targets = names[:settings.n_people]
    distractors = names[settings.n_people:settings.n_people + settings.n_distractor_people]
    background = names[settings.n_people + settings.n_distractor_people:]
    train_templates = {relation: train + (HARD_PARAPHRASES[relation] if hard else ())
                       for relation, (train, _) in RELATIONS.items()}

    facts: list[dict] = []
    for kind, people in (("target", targets), ("distractor", distractors)):
        for subject in people:
            for relation in RELATIONS:
                facts.append({"id": len(facts), "subject": subject, "relation": relation,
                              "object": str(rng.choice(pools[relation])), "kind": kind})
    target_facts = [fact for fact in facts if fact["kind"] == "target"]
    buckets = np.resize(np.array(FREQUENCY_BUCKETS), len(target_facts))[rng.permutation(len(target_facts))]
    for fact, bucket in zip(target_facts, buckets, strict=True):
        fact["frequency"] = int(bucket)
    for fact in facts:
        fact.setdefault("frequency", 1)

    documents: list[dict] = []
    for kind, people in (("fact", targets), ("distractor", distractors)):
        for subject in people:
            mentions = [(-1, ALIAS_TEMPLATE.format(s=subject, a=aliases[subject]))] if hard else []
            for fact in facts:
                if fact["subject"] != subject:
                    continue
                relation, obj = fact["relation"], fact["object"]
                if hard:
                    mentions += _aliased_mentions(rng, fact["id"], subject, aliases[subject], relation, obj,
                                                  fact["frequency"], train_templates[relation])
                    mentions += _decoy_mentions(rng, -len(mentions) - 2, subject, relation, obj, pools[relation])
                else:
                    mentions += _fact_mentions(rng, fact["id"], subject, relation, obj, fact["frequency"],
                                               train_templates[relation])
            for fact_ids, sentences in _documents(rng, mentions):
                documents.append({"id": len(documents), "kind": kind, "facts": [f for f in fact_ids if f >= 0],
                                  "text": " ".join(sentences)})
    order = rng.permutation(len(documents))
    documents = [{**documents[i], "id": new_id} for new_id, i in enumerate(order)]

    label_keys = (("subject", "relation", "object"), ("subject",), ("relation",), ("object",))
    stating: dict[tuple, set[int]] = {}  # (keys, their values) -> ids of the documents stating such a fact
    for doc in documents:
        for keys, fact_id in ((keys, f) for f in doc["facts"] for keys in label_keys):
            stating.setdefault((keys, tuple(facts[fact_id][key] for key in keys)), set()).add(doc["id"])
    queries = []
    for fact in target_facts:
        template = str(rng.choice(RELATIONS[fact["relation"]][1]))

        def sharing(*keys, fact=fact):
            return stating.get((keys, tuple(fact[key] for key in keys)), set())

        gold = set(sharing("subject", "relation", "object"))
        queries.append({
            "id": len(queries), "fact": fact["id"], "relation": fact["relation"], "frequency": fact["frequency"],
            "template": template, "prompt": template.format(s=fact["subject"]), "target": fact["object"],
            "gold": sorted(gold),
            **{f"same_{key}": sorted(set(sharing(key)) - gold) for key in ("subject", "relation", "object")},
        })

    background_mentions = []
    for subject in background:
        mentions = [(-1, ALIAS_TEMPLATE.format(s=subject, a=aliases[subject]))] if hard else []
        for relation, (_, query_templates) in RELATIONS.items():
            every = train_templates[relation] + tuple(t + " {o} ." for t in query_templates)
            obj = str(rng.choice(pools[relation]))
            if hard:
                mentions += _aliased_mentions(rng, len(mentions), subject, aliases[subject], relation, obj,
                                              settings.background_mentions, every)
                mentions += _decoy_mentions(rng, -len(mentions) - 2, subject, relation, obj, pools[relation])
            else:
                mentions += _fact_mentions(rng, len(mentions), subject, relation, obj, settings.background_mentions,
                                           every)
        background_mentions += [" ".join(sentences) for _, sentences in _documents(rng, mentions)]

    words = {word for text in [d["text"] for d in documents] + background_mentions for word in text.split()}
    words |= {word for q in queries for word in (q["prompt"] + " " + q["target"]).split()}
    corpus = {
        "vocabulary": list(SPECIAL_TOKENS) + sorted(words),
        "relations": {name: {"train_templates": list(train_templates[name]), "query_templates": list(query)}
                      for name, (_, query) in RELATIONS.items()},
        "frequency_buckets": list(FREQUENCY_BUCKETS),
        "facts": facts,
        "documents": documents,
        "queries": queries,
        "background_documents": background_mentions,
    }
    if hard:  # the simple world's corpus (and so its SHA-256) is the one recorded before worlds existed
        corpus["world"] = settings.world
        corpus["aliases"] = aliases
        for name, relation in corpus["relations"].items():
            relation["decoy_templates"] = list(DECOY_TEMPLATES[name])
    return corpus


def corpus_sha256(corpus: dict) -> str:
    """SHA-256 of the corpus's canonical JSON (sorted keys), recorded in the run-set metadata."""
    return hashlib.sha256(json.dumps(corpus, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- encoding
def _encode_documents(texts: list[str], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token inputs and targets of whole documents (<bos> words <eos>), right-padded; pads ignored."""
    rows = [[BOS] + [index[w] for w in text.split()] + [EOS] for text in texts]
    width = max(len(row) for row in rows) - 1
    inputs = torch.full((len(rows), width), PAD, dtype=torch.int64)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for r, row in enumerate(rows):
        inputs[r, :len(row) - 1] = torch.tensor(row[:-1])
        targets[r, :len(row) - 1] = torch.tensor(row[1:])
    return inputs, targets


def _encode_queries(queries: list[dict], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs <bos> prompt object[:-1] and targets that score only the object token(s), right-padded."""
    rows = []
    for query in queries:
        prompt = [BOS] + [index[w] for w in query["prompt"].split()]
        rows.append((prompt, [index[w] for w in query["target"].split()]))
    width = max(len(prompt) + len(target) - 1 for prompt, target in rows)
    inputs = torch.full((len(rows), width), PAD, dtype=torch.int64)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for r, (prompt, target) in enumerate(rows):
        sequence = prompt + target
        inputs[r, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[r, len(prompt) - 1:len(sequence) - 1] = torch.tensor(target)
    return inputs, targets


def _model_config(settings: FactsSettings, corpus: dict) -> TinyLMConfig:
    longest = max(len(text.split()) for text in [d["text"] for d in corpus["documents"]]
                  + corpus["background_documents"]) + 2
    return TinyLMConfig(vocab_size=len(corpus["vocabulary"]), max_len=longest, d_model=settings.d_model,
                        n_layers=settings.n_layers, n_heads=settings.n_heads, d_ff=settings.d_ff)


# --------------------------------------------------------------------------------------------- the base
def _adamw(params, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay)


def _adamw_root(params, weight_decay: float, eps_root: float) -> torch.optim.Optimizer:
    return AdamW(params, lr=0.0, eps=0.0, eps_root=eps_root, weight_decay=weight_decay)


_BASES: dict[str, dict[str, torch.Tensor]] = {}  # per-process memo: key -> pretrained state_dict


def _pretrain(settings: FactsSettings, corpus: dict, config: TinyLMConfig, pretrain_seed: int) -> TinyLM:
    index = {word: i for i, word in enumerate(corpus["vocabulary"])}
    inputs, targets = _encode_documents(corpus["background_documents"], index)
    with single_thread_deterministic():
        torch.manual_seed(pretrain_seed)
        model = TinyLM(config)
        optimizer = _adamw(model.parameters(), weight_decay=0.01)
        schedule = WarmupCosine(settings.pretrain_lr, settings.pretrain_steps,
                                warmup_steps=max(1, settings.pretrain_steps // 10))
        sampler = torch.Generator().manual_seed(pretrain_seed)
        model.train()
        for step in range(1, settings.pretrain_steps + 1):
            batch = torch.randint(len(inputs), (settings.pretrain_batch,), generator=sampler)
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            optimizer.zero_grad(set_to_none=True)
            token_nll(model(inputs[batch]), targets[batch]).mean().backward()
            optimizer.step()
    return model


def pretrained_base(seed: int, settings: FactsSettings, data_seed: int, pretrain_seed: int,
                    cache: str | None = None) -> TinyLM:
    """The pretrained base model of a facts task (the task's ``make_model``).

    The base depends on the settings, ``data_seed`` and ``pretrain_seed`` only; ``seed`` (the generator's
    init seed) is ignored, so every caller gets the same weights. It is pretrained once per process (memo)
    and, with ``cache`` (a ``.pt`` path), loaded from / saved to that file, checked by its settings key.
    """
    del seed
    key = json.dumps({"settings": _recorded_settings(settings), "data_seed": data_seed, "pretrain_seed": pretrain_seed},
                     sort_keys=True)
    corpus = build_corpus(settings, data_seed)
    model = TinyLM(_model_config(settings, corpus))
    state = _BASES.get(key)
    if state is None and cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            state = saved["model"]
    if state is None:
        state = _pretrain(settings, corpus, model.config, pretrain_seed).state_dict()
    if cache is not None and not _cache_holds(cache, key):  # also when the base came from this process's memo
        buffer = io.BytesIO()
        torch.save({"key": key, "model": state}, buffer)
        atomic_write_bytes(cache, buffer.getvalue())
    _BASES[key] = state
    model.load_state_dict(state)
    return model


def _cache_holds(cache: str | os.PathLike, key: str) -> bool:
    """Whether the cache file exists and holds the base for ``key``."""
    if not Path(cache).is_file():
        return False
    return torch.load(cache, weights_only=True).get("key") == key


# --------------------------------------------------------------------------------------------- the task
def _settings(tier: str | FactsSettings) -> tuple[str, FactsSettings]:
    if isinstance(tier, FactsSettings):
        return "custom", tier
    if tier not in TIERS:
        raise SimfluenceError(f"facts tier must be one of {sorted(TIERS)}, got {tier!r}")
    return tier, TIERS[tier]


def facts_task(tier: str | FactsSettings = "default", data_seed: int = 0, pretrain_seed: int = 0,
               base_cache: str | os.PathLike | None = None) -> Task:
    """The facts task: documents as the pool, queries as the test set, the pretrained base, AdamW.

    Parameters
    ----------
    tier : ``"default"``, ``"mini"``, ``"hard"`` (the default sizes in the hard world), each also as
        ``"<tier>-smooth"`` (fine-tuned with the smooth recipe :data:`SMOOTH`), or a :class:`FactsSettings`.
    data_seed : seed of the world and corpus.
    pretrain_seed : seed of the base model's initial weights and pretraining batches.
    base_cache : ``.pt`` file the pretrained base is loaded from / saved to (default: pretrain in memory).

    Returns
    -------
    Task with pool inputs / targets (n_documents, width) int64 token ids (targets ``IGNORE`` on pads) and
    test inputs / targets (n_queries, width) with targets only on the object tokens; ``loss_fn`` is
    :func:`~simfluence.workloads.tinylm.token_nll`. ``metadata["corpus"]`` holds the corpus (dropped from
    the manifest by :func:`generate_facts`, which writes it to ``facts_corpus.json``).
    """
    tier_name, settings = _settings(tier)
    corpus = build_corpus(settings, data_seed)
    index = {word: i for i, word in enumerate(corpus["vocabulary"])}
    pool_inputs, pool_targets = _encode_documents([doc["text"] for doc in corpus["documents"]], index)
    test_inputs, test_targets = _encode_queries(corpus["queries"], index)
    schedule = WarmupCosine(settings.lr, settings.n_steps, warmup_steps=max(1, settings.n_steps // 10))
    config = _model_config(settings, corpus)
    metadata = {
        "workload": "facts",
        "tier": tier_name,
        "settings": _recorded_settings(settings),
        "data_seed": data_seed,
        "pretrain_seed": pretrain_seed,
        "model": config.describe(),
        "optimizer": {"kind": "adamw", "weight_decay": settings.weight_decay,
                      **({"eps": 0.0, "eps_root": settings.eps_root} if settings.eps_root > 0 else {})},
        "lr_schedule": schedule.describe(),
        "loss": {"pool": "mean token NLL of the document", "test": "NLL of the object token(s) given the prompt"},
        "corpus_file": CORPUS_FILE,
        "corpus_sha256": corpus_sha256(corpus),
        "base_checkpoint": BASE_FILE,
        "n_documents": len(corpus["documents"]),
        "n_queries": len(corpus["queries"]),
        "corpus": corpus,
    }
    return Task(
        make_model=functools.partial(pretrained_base, settings=settings, data_seed=data_seed,
                                     pretrain_seed=pretrain_seed,
                                     cache=None if base_cache is None else str(base_cache)),
        pool_inputs=pool_inputs, pool_targets=pool_targets,
        test_inputs=test_inputs, test_targets=test_targets,
        loss_fn=token_nll,
        make_optimizer=(functools.partial(_adamw_root, weight_decay=settings.weight_decay, eps_root=settings.eps_root)
                        if settings.eps_root > 0 else functools.partial(_adamw, weight_decay=settings.weight_decay)),
        lr_at=schedule,
        metadata=metadata,
    )


def facts_task_from_runset(runset: RunSet) -> Task:
    """Rebuild the :func:`facts_task` a facts run set was generated with, from its manifest metadata.

    The world is regenerated from the recorded settings and seeds and checked against the recorded corpus
    hash; the base is loaded from ``RUNSET/base.pt`` when it is there (else pretrained again, identically).
    """
    meta = runset.metadata
    where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
    if meta.get("workload") != "facts":
        raise SimfluenceError(f"{where} was not generated by the facts workload (workload={meta.get('workload')!r})")
    try:
        settings = FactsSettings(**meta["settings"])
        tier = meta["tier"] if meta["tier"] in TIERS and TIERS[meta["tier"]] == settings else settings
        cache = None if runset.path is None else Path(runset.path) / meta["base_checkpoint"]
        task = facts_task(tier, data_seed=int(meta["data_seed"]), pretrain_seed=int(meta["pretrain_seed"]),
                          base_cache=cache)
        recorded_hash = meta["corpus_sha256"]
    except (KeyError, TypeError) as err:
        raise SimfluenceError(f"{where}: facts metadata is incomplete ({err!r} missing or malformed)") from None
    if task.metadata["corpus_sha256"] != recorded_hash:
        raise SimfluenceError(f"{where}: the rebuilt facts corpus does not match the recorded corpus_sha256")
    if task.n_pool != runset.n_pool or task.n_test < runset.n_test:  # fewer tests: a run set of chosen tests
        raise SimfluenceError(f"{where}: rebuilt task has {task.n_pool} pool / {task.n_test} test examples, "
                              f"the run set {runset.n_pool} / {runset.n_test}")
    del task.metadata["corpus"]
    task.metadata.update({key: meta[key] for key in ("batch_size", "n_steps", "subset_size", "curriculum_seed")
                          if key in meta})
    return task


def load_corpus(runset: RunSet) -> dict:
    """The corpus (documents, queries, labels) of a facts run set, from its ``facts_corpus.json``."""
    if runset.path is None:
        raise SimfluenceError("the run set has no folder, so it has no facts corpus file")
    path = Path(runset.path) / runset.metadata.get("corpus_file", CORPUS_FILE)
    if not path.is_file():
        raise SimfluenceError(f"{str(path)!r} is missing: the facts corpus of the run set")
    return json.loads(path.read_text(encoding="utf-8"))


def generate_facts(
    out: str | os.PathLike,
    tier: str | FactsSettings = "default",
    n_runs: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    checkpoint_steps: tuple[int, ...] = (),
    progress: bool = True,
    log_every: int = 1,
    data_seed: int = 0,
    overwrite: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    smooth: bool = False,
    device: str | None = None,
) -> RunSet:
    """Pretrain the base once, then fine-tune ``n_runs`` runs on random document subsets and log them to ``out``.

    Run r fine-tunes the base on ``round(subset_fraction * n_documents)`` documents drawn afresh, in shuffled
    epochs of the tier's batch size (``random_curricula`` with ``seed``); the base (pretrain seed ``seed``)
    is cached in ``out/base.pt`` and the corpus written to ``out/facts_corpus.json``. Re-running over an
    existing folder resumes it (see :func:`~simfluence.training.generate_runs`, which also describes
    ``backend="ray"`` and ``ray_address``; Ray workers without a shared file system pretrain the base once each).
    ``smooth``: fine-tune with the smooth recipe :data:`SMOOTH` (tier ``"<tier>-smooth"``: AdamW with eps inside
    the square root; the world, the base and the batches stay the tier's). ``device``: the torch device the
    fine-tuning runs train on (default the CPU; the base is pretrained on the CPU; see
    :func:`~simfluence.training.generate_runs`).
    """
    out = Path(out)
    if smooth:
        tier = replace(tier, **SMOOTH) if isinstance(tier, FactsSettings) else f"{tier.removesuffix('-smooth')}-smooth"
    tier_name, settings = _settings(tier)
    n_runs = settings.n_runs if n_runs is None else int(n_runs)
    tier_or_settings = settings if tier_name == "custom" else tier_name
    task = facts_task(tier_or_settings, data_seed=data_seed, pretrain_seed=seed)
    corpus = task.metadata.pop("corpus")
    task, curricula = random_runs_plan(task, n_runs, settings.n_steps, settings.batch_size, settings.subset_fraction,
                                       seed)
    request = check_request(task, curricula, None, seed, log_every, checkpoint_steps, None, backend, device=device)
    # One rule for every writer: a folder that is not a run set is refused before anything is written; a run set
    # is resumed (with the same settings only) or, with overwrite, rebuilt aside and swapped in when complete.
    final = out if out.name not in ("", "..") else Path(os.path.abspath(out))  # "." is replaced by its real name
    with runset_destination(out, overwrite) as target:
        check_resumable(target, request)  # before the corpus or the base of another setting is written over
        target.mkdir(parents=True, exist_ok=True)
        task = replace(task, make_model=functools.partial(pretrained_base, settings=settings, data_seed=data_seed,
                                                          pretrain_seed=seed, cache=str(target / BASE_FILE)))
        request = replace(request, task=task)
        # compact: indented JSON would put every label id on its own line
        atomic_write_bytes(target / CORPUS_FILE,
                           json.dumps(corpus, separators=(",", ":"), allow_nan=False).encode("utf-8"))
        task.make_model(seed)  # pretrain once here (and cache it) rather than in every worker
        train_into(target, request, workers, progress, backend, ray_address)
    return RunSet.load(final)
