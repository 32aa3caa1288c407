"""Hugging Face Trainer integration: logged runs equal the plain loop's, fit, and answer counterfactuals.

Models are built from tiny configs (no weights or tokenizers are downloaded); inputs are integer tokens.
Causal-LM labels mask position 0 (-100) so that Trainer's token count of a step (labels != -100) equals the
number of next-token predictions, and a step's loss is the plain loop's mean over its examples.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers  # a missing hf extra fails the collection, naming it, rather than skipping
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from simfluence.counterfactual import loo_effects
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import RunLogError
from simfluence.integrations import IndexedDataset, ProbeSet, causal_lm_losses, classification_losses
from simfluence.integrations.huggingface import (
    CurriculumTrainer,
    IdCollator,
    SimfluenceCallback,
    TrainerTask,
)
from simfluence.methods import make_simulator
from simfluence.runlog import RunSet
from simfluence.task import Task
from simfluence.workloads.generator import generate_runs

N_POOL, N_TEST, SEQ_LEN, VOCAB, LR = 24, 6, 8, 50, 0.5
CONFIG = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: tiny matrices run fastest (and steadiest) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def make_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(CONFIG)


def lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_losses(outputs.logits, labels)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


def constant_lr(step: int) -> float:
    return LR


def decaying_lr(step: int) -> float:
    return LR / step


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, VOCAB, (N_POOL, SEQ_LEN), generator=generator)
    test = torch.randint(0, VOCAB, (N_TEST, SEQ_LEN), generator=generator)
    labels = pool.clone()
    labels[:, 0] = -100
    return {"pool": pool, "labels": labels, "test": test}


def lm_task(tokens, task_type=Task, lr_at=constant_lr, **extra) -> Task:
    return task_type(make_lm, tokens["pool"], tokens["labels"], tokens["test"], tokens["test"], lm_loss, sgd,
                     lr_at, **extra)


def trainer_args(tmp_path, **options) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "trainer"), gradient_accumulation_steps=2, learning_rate=LR,
                    lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to="none",
                    save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**defaults, **options})


def pool_examples(tokens) -> list[dict]:
    return [{"input_ids": tokens["pool"][i], "labels": tokens["labels"][i]} for i in range(N_POOL)]


def test_causal_lm_losses_are_the_models_own_loss_per_example(tokens):
    model = make_lm(0).eval()
    labels = tokens["test"].clone()
    labels[0, 5:] = -100  # a padded example
    with torch.no_grad():
        losses = causal_lm_losses(model(input_ids=tokens["test"]).logits, labels)
        for row in range(N_TEST):
            own = model(input_ids=tokens["test"][row : row + 1], labels=labels[row : row + 1]).loss
            assert losses[row].item() == pytest.approx(own.item(), rel=1e-5)


def test_classification_losses_are_the_models_own_loss_per_example(tokens):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    probe = ProbeSet({"input_ids": tokens["test"], "labels": labels}, batch_size=4)
    losses = probe(model)
    assert losses.shape == (N_TEST,) and losses.dtype == np.float64
    with torch.no_grad():
        for row in range(N_TEST):
            own = model(input_ids=tokens["test"][row : row + 1], labels=labels[row : row + 1]).loss
            assert losses[row] == pytest.approx(own.item(), rel=1e-5)
        logits = model(input_ids=tokens["test"]).logits
    assert torch.allclose(classification_losses(logits, labels), torch.tensor(losses, dtype=torch.float32))


def test_trainer_runs_with_gradient_accumulation_match_the_plain_loop_then_fit_and_query(tokens, tmp_path):
    curricula = random_curricula(3, N_POOL, 4, 6, subset_size=16, seed=0)
    plain = generate_runs(lm_task(tokens), curricula, tmp_path / "plain", workers=1, progress=False)

    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    for index, curriculum in enumerate(curricula):
        model = make_lm(0)
        callback = SimfluenceCallback(tmp_path / "hf", f"run-{index:03d}", probe, log_every=2)
        trainer = CurriculumTrainer(model=model, args=trainer_args(tmp_path), train_dataset=pool_examples(tokens),
                                    optimizers=(sgd(model.parameters()), None), callbacks=[callback],
                                    curriculum=curriculum)
        trainer.train()
    logged = RunSet.load(tmp_path / "hf")

    assert len(logged) == 3 and logged.n_pool == N_POOL and logged.n_test == N_TEST
    for real, mine in zip(plain, logged, strict=True):
        assert mine.curriculum == real.curriculum  # the same ids in every step, micro-batches joined
        assert np.allclose(mine.learning_rates, LR)
        assert mine.logged_steps.tolist() == [0, 2, 4, 6]
        real_losses = np.asarray(real.losses)[mine.logged_steps]
        assert np.allclose(np.asarray(mine.losses), real_losses, atol=1e-5)
        assert mine.metadata["gradient_accumulation_steps"] == 2

    simulator = make_simulator("linear_mom").fit(logged)
    effects = loo_effects(simulator, logged[0])
    assert effects.effects.shape == (N_POOL, N_TEST)
    assert np.isfinite(effects.effects).all()
    assert effects.present.sum() == np.unique(logged[0].curriculum.ids).size


def test_plain_trainer_logs_the_ids_its_own_sampler_drew(tokens, tmp_path):
    """Trainer's shuffled sampler, 2 examples x 2 micro-batches a step: one epoch logs every pool id once."""
    model = make_lm(0)
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    callback = SimfluenceCallback(tmp_path / "hf", "shuffled", probe, log_every=4)
    args = trainer_args(tmp_path, per_device_train_batch_size=2, num_train_epochs=1, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=IndexedDataset(pool_examples(tokens)),
                      data_collator=IdCollator(), callbacks=[callback])
    trainer.train()
    run = RunSet.load(tmp_path / "hf")["shuffled"]
    assert run.n_steps == N_POOL // 4
    assert (run.curriculum.batch_sizes == 4).all()
    assert sorted(run.curriculum.ids.tolist()) == list(range(N_POOL))
    assert run.logged_steps.tolist() == [0, 4, 6]


def test_trainer_without_an_id_column_says_how_to_add_it(tokens, tmp_path):
    model = make_lm(0)
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    callback = SimfluenceCallback(tmp_path / "hf", "no-ids", probe)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=pool_examples(tokens),
                      callbacks=[callback])
    with pytest.raises(RunLogError, match="IndexedDataset"):
        trainer.train()


def test_trainer_task_retrains_uneven_micro_batches_like_the_plain_loop(tokens, tmp_path):
    """Steps of 5 and 3 examples cut 3+2 and 2+1: each micro-batch weighs by its share of the step.

    The task's schedule (lr_at(t) = LR / t) drives Trainer's optimizer and is logged step by step.
    """
    curricula = [Curriculum.from_batches([[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 1]], n_pool=N_POOL),
                 Curriculum.from_batches([[3, 3, 4], [12, 13, 14, 15, 16], [2, 9, 20]], n_pool=N_POOL)]
    plain = generate_runs(lm_task(tokens, lr_at=decaying_lr), curricula, tmp_path / "plain", workers=1,
                          progress=False)
    task = lm_task(tokens, TrainerTask, lr_at=decaying_lr, training_kwargs={"gradient_accumulation_steps": 2})
    retrained = generate_runs(task, curricula, tmp_path / "trainer", workers=1, progress=False)
    for real, mine in zip(plain, retrained, strict=True):
        assert mine.curriculum == real.curriculum
        assert mine.logged_steps.tolist() == real.logged_steps.tolist()
        assert np.allclose(mine.learning_rates, [LR, LR / 2, LR / 3])
        assert np.allclose(real.learning_rates, mine.learning_rates)
        assert np.allclose(np.asarray(mine.losses), np.asarray(real.losses), atol=1e-5)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "simfluence.integrations.huggingface", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'simfluence\[hf\]'"):
        importlib.import_module("simfluence.integrations.huggingface")


def test_the_core_library_does_not_import_transformers():
    code = ("import sys, simfluence, simfluence.integrations, simfluence.workloads, simfluence.task; "
            "print('transformers' in sys.modules, 'lightning' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def _ddp_worker(rank: int, world_size: int, port: int, out: str, curriculum: Curriculum, tokens: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    from pathlib import Path

    model = make_lm(0)
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    callback = SimfluenceCallback(Path(out) / "ddp", "run-000", probe, log_every=2)
    trainer = CurriculumTrainer(model=model, args=trainer_args(Path(out), ddp_backend="gloo"),
                                train_dataset=pool_examples(tokens), optimizers=(sgd(model.parameters()), None),
                                callbacks=[callback], curriculum=curriculum)
    trainer.train()
    torch.distributed.destroy_process_group()
    # leave without running destructors: tearing down DDP's reducer after its gloo group can deadlock (the group's
    # worker thread waits for the GIL the destructor holds); everything the test reads is on disk already
    os._exit(0)


def test_two_gloo_ranks_with_accumulation_log_the_whole_step_like_the_plain_loop(tokens, tmp_path, spawn_with_timeout):
    """2 CPU processes x 2 micro-batches: each 8-example step is cut in 4 chunks, gathered back on rank 0."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    curriculum = random_curricula(1, N_POOL, 8, 4, seed=3)[0]
    plain = generate_runs(lm_task(tokens), [curriculum], tmp_path / "plain", workers=1, progress=False)[0]
    spawn_with_timeout(_ddp_worker, (2, port, str(tmp_path), curriculum, tokens), nprocs=2, timeout=120)
    run = RunSet.load(tmp_path / "ddp")[0]
    assert run.curriculum == curriculum
    assert run.metadata["world_size"] == 2
    assert np.allclose(np.asarray(run.losses), np.asarray(plain.losses)[run.logged_steps], atol=1e-5)


def test_a_failed_training_leaves_an_aborted_run_with_its_completed_steps(tokens, tmp_path):
    class Crash(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("out of memory, say")

    model = make_lm(0)
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    callback = SimfluenceCallback(tmp_path / "hf", "crashed", probe)
    curriculum = random_curricula(1, N_POOL, 4, 6, seed=0)[0]
    trainer = CurriculumTrainer(model=model, args=trainer_args(tmp_path), train_dataset=pool_examples(tokens),
                                optimizers=(sgd(model.parameters()), None), callbacks=[callback, Crash()],
                                curriculum=curriculum)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    run = RunSet.load(tmp_path / "hf")["crashed"]
    assert not run.complete
    assert run.curriculum == curriculum.truncate(3)
