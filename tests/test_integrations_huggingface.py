"""Hugging Face Trainer integration: logged runs equal the plain loop's, fit, and answer counterfactuals.

Models are built from tiny configs (no weights or tokenizers are downloaded); inputs are integer tokens.
Causal-LM labels mask position 0 (-100) so that Trainer's token count of a step (labels != -100) equals the
number of next-token predictions, and a step's loss is the plain loop's mean over its examples.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

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

from simfluence.attribution.checkpoints import checkpoint_steps, load_checkpoints
from simfluence.attribution.trackstar import second_moment_scale
from simfluence.cli import main
from simfluence.counterfactual import loo_effects
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import RunLogError, TaskError
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
from simfluence.training import generate_runs

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


@pytest.mark.parametrize("step_loss", ["trainer", "examples"])
def test_trainer_task_retrains_uneven_micro_batches_like_the_plain_loop(tokens, tmp_path, step_loss):
    """Steps of 5 and 3 examples cut 3+2 and 2+1: each micro-batch weighs by its share of the step.

    Every example has SEQ_LEN - 1 predicted tokens, so Trainer's token mean is the plain loop's example mean.
    The task's schedule (lr_at(t) = LR / t) drives Trainer's optimizer and is logged step by step; Trainer's
    default clipping (max_grad_norm 1.0) is turned off, as the plain loop does not clip.
    """
    curricula = [Curriculum.from_batches([[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 1]], n_pool=N_POOL),
                 Curriculum.from_batches([[3, 3, 4], [12, 13, 14, 15, 16], [2, 9, 20]], n_pool=N_POOL)]
    plain = generate_runs(lm_task(tokens, lr_at=decaying_lr), curricula, tmp_path / "plain", workers=1,
                          progress=False)
    task = lm_task(tokens, TrainerTask, lr_at=decaying_lr, step_loss=step_loss,
                   training_kwargs={"gradient_accumulation_steps": 2, "max_grad_norm": 0.0})
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


# ------------------------------------------------- a logged Trainer fine-tune, retrained by TrainerTask (issue 21)
PAD = 0


def varied_length_examples(n_examples: int, seed: int) -> list[dict]:
    """Token sequences of 3..SEQ_LEN tokens: Trainer's token mean and the mean over examples differ."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, SEQ_LEN + 1, (n_examples,), generator=generator)
    return [{"input_ids": torch.randint(1, VOCAB, (int(length),), generator=generator)} for length in lengths]


def pad_right(examples: list[dict], length: int | None = None) -> dict[str, torch.Tensor]:
    """A collator: pad on the right to the longest example (or ``length``); labels -100 and mask 0 on padding."""
    length = length or max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = example["input_ids"]
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def adamw_trainer_args(tmp_path, **options) -> TrainingArguments:
    """Trainer's own AdamW (weight decay 0.01 on all but biases and norms), warm-up then linear decay, clipping 1.0."""
    return trainer_args(tmp_path, **{"learning_rate": 0.01, "weight_decay": 0.01, "lr_scheduler_type": "linear",
                                     "warmup_steps": 2, "max_grad_norm": 1.0, **options})


@pytest.fixture(scope="module")
def varied():
    pool, test = varied_length_examples(N_POOL, 1), varied_length_examples(N_TEST, 2)
    pool_batch, test_batch = pad_right(pool, SEQ_LEN), pad_right(test, SEQ_LEN)
    return {"pool": pool, "pool_ids": pool_batch["input_ids"], "pool_labels": pool_batch["labels"],
            "test": test_batch}


def log_adamw_run(varied, tmp_path, curriculum, checkpoint_steps=()) -> RunSet:
    probe = ProbeSet(varied["test"])
    callback = SimfluenceCallback(tmp_path / "hf", "run-000", probe, log_every=1, checkpoint_steps=checkpoint_steps)
    trainer = CurriculumTrainer(model_init=lambda: GPT2LMHeadModel(CONFIG), args=adamw_trainer_args(tmp_path),
                                train_dataset=varied["pool"], data_collator=pad_right, callbacks=[callback],
                                curriculum=curriculum)
    trainer.train()
    return RunSet.load(tmp_path / "hf")


def task_of_logged_run(varied, runset: RunSet, **fields) -> TrainerTask:
    return TrainerTask.from_logged_run(runset, 0, make_model=make_lm, pool_inputs=varied["pool_ids"],
                                       pool_targets=varied["pool_labels"], test_inputs=varied["test"]["input_ids"],
                                       test_targets=varied["test"]["labels"], loss_fn=lm_loss, **fields)


def test_trainer_task_from_a_logged_run_reproduces_a_varied_length_adamw_fine_tune(varied, tmp_path):
    """Token-mean loss over 2 micro-batches, clipping 1.0, Trainer's AdamW with weight decay, warm-up + decay."""
    curriculum = random_curricula(1, N_POOL, 6, 6, seed=5)[0]
    logged = log_adamw_run(varied, tmp_path, curriculum)[0]
    recorded = logged.metadata["training_arguments"]
    assert recorded["max_grad_norm"] == 1.0 and recorded["weight_decay"] == 0.01
    assert logged.metadata["weight_decay"] == 0.01

    task = task_of_logged_run(varied, RunSet.load(tmp_path / "hf"))
    retrained = generate_runs(task, [curriculum], tmp_path / "retrained", seeds=[logged.metadata["seed"]],
                              init_seed=task.init_seed, workers=1, progress=False)[0]
    difference = np.abs(np.asarray(retrained.losses) - np.asarray(logged.losses)).max()
    print(f"max |retrained - logged| test loss over {curriculum.n_steps} steps: {difference:.2e}")
    assert difference < 1e-5
    assert np.allclose(retrained.learning_rates, logged.learning_rates, rtol=1e-7)
    assert retrained.metadata["training_arguments"] == logged.metadata["training_arguments"]

    # the old reduction (mean over examples) retrains another run: the check above can fail
    examples = task_of_logged_run(varied, RunSet.load(tmp_path / "hf"), step_loss="examples")
    other = generate_runs(examples, [curriculum], tmp_path / "examples", seeds=[logged.metadata["seed"]],
                          init_seed=task.init_seed, workers=1, progress=False)[0]
    assert np.abs(np.asarray(other.losses) - np.asarray(logged.losses)).max() > 100 * max(difference, 1e-7)


def test_a_trainer_task_refuses_an_empty_step_naming_it(tokens):
    task = lm_task(tokens, TrainerTask)
    curricula = [Curriculum.from_batches([[0, 1], [2]], n_pool=N_POOL),
                 Curriculum.from_batches([[0, 1], [], [2]], n_pool=N_POOL)]
    with pytest.raises(TaskError, match=r"curricula\[1\]: a TrainerTask cannot train step 2"):
        task.check_curricula(curricula)


def test_generating_a_curriculum_a_trainer_task_cannot_train_leaves_nothing_behind(tokens, tmp_path):
    task = lm_task(tokens, TrainerTask)
    curricula = [Curriculum.from_batches([[0, 1], [], [2]], n_pool=N_POOL)]
    with pytest.raises(TaskError, match="cannot train step 2"):
        generate_runs(task, curricula, tmp_path / "hf", workers=1, progress=False)
    assert not (tmp_path / "hf").exists()


def test_the_callback_logs_pool_positions_when_the_pool_ids_are_other_integers(tokens, tmp_path):
    """Ids 1000.. are not positions: the callback logs the positions its batches carry, as positions."""
    model = make_lm(0)
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    callback = SimfluenceCallback(tmp_path / "hf", "run-000", probe, pool_ids=[1000 + i for i in range(N_POOL)])
    curriculum = random_curricula(1, N_POOL, 4, 2, seed=0)[0]
    CurriculumTrainer(model=model, args=trainer_args(tmp_path), train_dataset=pool_examples(tokens),
                      optimizers=(sgd(model.parameters()), None), callbacks=[callback], curriculum=curriculum).train()
    assert RunSet.load(tmp_path / "hf")[0].curriculum == curriculum


def test_from_logged_run_refuses_a_run_without_training_arguments(tmp_path, small_runset):
    small_runset.save(tmp_path / "plain")
    with pytest.raises(TaskError, match="records no training arguments"):
        TrainerTask.from_logged_run(tmp_path / "plain", 0, make_model=make_lm)


def test_the_callback_saves_checkpoints_in_the_run_sets_format(varied, tmp_path):
    curriculum = random_curricula(1, N_POOL, 6, 4, seed=6)[0]
    run = log_adamw_run(varied, tmp_path, curriculum, checkpoint_steps=(0, 2, 4))[0]
    runset = RunSet.load(tmp_path / "hf")
    assert checkpoint_steps(runset, run) == [0, 2, 4]
    saved = load_checkpoints(runset, run)
    assert [c.learning_rate for c in saved] == pytest.approx([run.learning_rates[0], *run.learning_rates[[1, 3]]])
    final = make_lm(0)
    final.load_state_dict(saved[-1].model_state)
    assert np.allclose(ProbeSet(varied["test"])(final), np.asarray(run.losses)[-1], atol=1e-6)
    # Trainer groups decayed and other parameters apart; the saved positions are the model's parameter order
    shapes = [tuple(parameter.shape) for parameter in final.parameters()]
    state = saved[-1].optimizer_state["state"]
    assert sorted(state) == list(range(len(shapes)))
    assert all(tuple(state[position]["exp_avg_sq"].shape) == shapes[position] for position in state)
    assert second_moment_scale(final, saved[-1]) is not None


def test_trainer_task_saves_checkpoints_when_generating(varied, tmp_path):
    curriculum = random_curricula(1, N_POOL, 6, 4, seed=6)[0]
    log_adamw_run(varied, tmp_path, curriculum)
    task = task_of_logged_run(varied, RunSet.load(tmp_path / "hf"))
    runset = generate_runs(task, [curriculum], tmp_path / "retrained", init_seed=task.init_seed,
                           checkpoint_steps=(0, 3, 4), workers=1, progress=False)
    run = runset[0]
    assert checkpoint_steps(runset, run) == [0, 3, 4]
    saved = load_checkpoints(runset, run)
    assert saved[1].learning_rate == pytest.approx(run.learning_rates[2])
    final = make_lm(0)
    final.load_state_dict(saved[-1].model_state)
    assert np.allclose(task.test_losses(final), np.asarray(run.losses)[-1], atol=1e-6)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_finetune.py"


def test_the_readme_hf_example_gives_runs_that_verify_reproduces_and_blend_fits(tmp_path, monkeypatch, capsys):
    """The example's commands (the README's Hugging Face section), with 4 runs of 6 steps and one worker."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_FINETUNE_RUNS", raising=False)
    spec = importlib.util.spec_from_file_location("hf_finetune_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    commands = [line.split() for line in example.__doc__.splitlines()
                if line.strip().startswith(("python examples/hf_finetune.py", "simfluence "))]
    assert [command[:2] for command in commands] == [["python", "examples/hf_finetune.py"],
                                                     ["simfluence", "verify"], ["simfluence", "fit"]]
    example.main([{"12": "4", "40": "6"}.get(word, word) for word in commands[0][2:]])
    runset = RunSet.load(tmp_path / "runs" / "hf-finetune")
    assert len(runset) == 4 and checkpoint_steps(runset, 0) == [0, 3, 6]
    assert np.isfinite(runset[0].learning_rates).all() and runset[0].logged_steps.tolist() == list(range(7))

    task = f"{EXAMPLE}:make_task"
    verify, fit = ([task if word == "examples/hf_finetune.py:make_task" else word for word in command[1:]]
                   for command in commands[1:])
    assert main([*verify, "--workers", "1"]) == 0
    reproduction = re.search(r"reproduces the logged run to (\S+)", capsys.readouterr().out)
    assert reproduction is not None and float(reproduction.group(1)) < 1e-5
    assert main(fit) == 0
    assert (tmp_path / fit[fit.index("--out") + 1]).is_file()
