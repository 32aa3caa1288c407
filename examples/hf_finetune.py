"""Fine-tune a tiny GPT-2 with Hugging Face ``Trainer`` on many curricula, logged for simfluence.

Nothing is downloaded: the model is built from a config and the corpus is made up here (sentences of 4 to 9
words, a word-level vocabulary), so examples differ in length, as real fine-tuning data do. Every run trains
one random curriculum with :class:`~simfluence.integrations.huggingface.CurriculumTrainer` (Trainer's own
AdamW, warm-up then linear decay, gradient accumulation 2, clipping 1.0) and
:class:`~simfluence.integrations.huggingface.SimfluenceCallback` logs what the methods need: the probe losses
after every step (``linear_mom`` needs every step), the learning rates, and checkpoints (``tracin``, ``blend``).

    python examples/hf_finetune.py --runs 12 --steps 40
    simfluence verify runs/hf-finetune --holdout 2 --task examples/hf_finetune.py:make_task --k 3 --out verify-hf
    simfluence fit runs/hf-finetune --method blend --task examples/hf_finetune.py:make_task --out hf-blend.npz

:func:`make_task` is the task of those runs for ``--task``: a
:class:`~simfluence.integrations.huggingface.TrainerTask` built from the training arguments the callback
recorded (``TrainerTask.from_logged_run``), so retraining a curriculum trains it as the logged runs were
trained. It reads the run set at ``$HF_FINETUNE_RUNS`` (default ``runs/hf-finetune``).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as transformers_logging

from simfluence.curriculum import random_curricula
from simfluence.integrations import ProbeSet, causal_lm_losses
from simfluence.integrations.huggingface import CurriculumTrainer, SimfluenceCallback, TrainerTask

RUNSET = os.environ.get("HF_FINETUNE_RUNS", "runs/hf-finetune")
N_POOL, N_PROBE, MAX_WORDS = 64, 16, 10
PAD = 0
SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother", "the baker"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "feeds", "calls", "helps"]
OBJECTS = ["the ball", "a red apple", "the garden", "an old book", "the river", "a warm loaf", "the moon", "a song"]
ENDINGS = ["", "today", "every morning", "near the house", "at night", "with great care"]
VOCAB = ["<pad>", *sorted({word for phrase in SUBJECTS + VERBS + OBJECTS + ENDINGS for word in phrase.split()})]
WORD_ID = {word: index for index, word in enumerate(VOCAB)}
CONFIG = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(VOCAB), n_positions=MAX_WORDS, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=PAD, eos_token_id=PAD,
                    attn_implementation="eager")  # per-example gradients (tracin) vmap it without a fallback
TRAINING = dict(learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=4,
                gradient_accumulation_steps=2, max_grad_norm=1.0, seed=0)


def sentences(count: int, seed: int, avoid: frozenset[str] = frozenset()) -> list[str]:
    """``count`` different made-up sentences of 4 to 9 words, none of them in ``avoid``."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, None] = {}
    while len(chosen) < count:
        parts = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS))
        text = " ".join(part for part in parts if part)
        if text not in avoid:
            chosen[text] = None
    return list(chosen)


def encode(texts: list[str]) -> dict[str, torch.Tensor]:
    """Word ids padded on the right to MAX_WORDS; labels -100 and attention mask 0 on padding."""
    input_ids = torch.full((len(texts), MAX_WORDS), PAD, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [WORD_ID[word] for word in text.split()]
        input_ids[row, : len(words)] = torch.tensor(words)
    mask = (input_ids != PAD).long()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def pad_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Collator: pad a batch on the right to its longest example (Trainer's usual dynamic padding)."""
    length = max(int(example["attention_mask"].sum()) for example in examples)
    return {key: torch.stack([example[key][:length] for example in examples]) for key in examples[0]}


def data() -> tuple[list[str], dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """(pool texts, pool encoding, probe texts, probe encoding); fixed by their seeds."""
    pool_texts = sentences(N_POOL, seed=1)
    probe_texts = sentences(N_PROBE, seed=2, avoid=frozenset(pool_texts))
    return pool_texts, encode(pool_texts), probe_texts, encode(probe_texts)


def make_model(seed: int) -> GPT2LMHeadModel:
    """The initial model; ``Trainer`` seeds (``TrainingArguments.seed``) before calling ``model_init``."""
    return GPT2LMHeadModel(CONFIG)


def lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) per-example mean next-token loss (what the probe logs)."""
    return causal_lm_losses(outputs.logits, labels)


def make_task() -> TrainerTask:
    """The task of the logged runs, for ``simfluence verify / fit --task examples/hf_finetune.py:make_task``."""
    _, pool, _, probe = data()
    return TrainerTask.from_logged_run(RUNSET, 0, make_model=make_model, pool_inputs=pool["input_ids"],
                                       pool_targets=pool["labels"], test_inputs=probe["input_ids"],
                                       test_targets=probe["labels"], loss_fn=lm_loss)


def log_runs(out: str, n_runs: int, n_steps: int, batch_size: int = 8) -> None:
    """Train and log ``n_runs`` random curricula of ``n_steps`` steps (each a random half of the pool)."""
    pool_texts, pool, probe_texts, probe = data()
    train_dataset = [{key: value[row] for key, value in pool.items()} for row in range(N_POOL)]
    probe_set = ProbeSet(probe)
    curricula = random_curricula(n_runs, N_POOL, batch_size, n_steps, subset_size=N_POOL // 2, seed=0)
    checkpoints = sorted({0, n_steps // 2, n_steps})
    for index, curriculum in enumerate(curricula):
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(output_dir=scratch, report_to="none", save_strategy="no", logging_strategy="no",
                                     disable_tqdm=True, use_cpu=True, **TRAINING)
            callback = SimfluenceCallback(out, f"run-{index:03d}", probe_set, pool_ids=pool_texts,
                                          test_ids=probe_texts, log_every=1, checkpoint_steps=checkpoints,
                                          overwrite=True)
            trainer = CurriculumTrainer(model_init=lambda: make_model(TRAINING["seed"]), args=args,
                                        train_dataset=train_dataset, data_collator=pad_batch, curriculum=curriculum,
                                        callbacks=[callback])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        print(f"logged run-{index:03d} ({n_steps} steps)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RUNSET, help="run-set folder (make_task reads $HF_FINETUNE_RUNS)")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args(argv)
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    log_runs(options.out, options.runs, options.steps)


if __name__ == "__main__":
    main()
