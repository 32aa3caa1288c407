"""Lightning integration: a run logged by the callback equals the plain loop's, and fits.

A tiny GPT-2 built from a config (nothing downloaded), integer tokens; labels mask position 0 as in the
Hugging Face tests. Multi-process (DDP) Lightning runs are not exercised here: the rank gathering they use is
the shared StepRecorder's, tested with two gloo processes in test_integrations_sampler.py.
"""
from __future__ import annotations

import importlib
import sys

import lightning.pytorch as pl  # a missing extra fails here rather than skipping
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from simfluence.counterfactual import loo_effects
from simfluence.curriculum import random_curricula
from simfluence.integrations import IndexedDataset, ProbeSet, causal_lm_losses, curriculum_dataloader
from simfluence.integrations.lightning import SimfluenceLightningCallback
from simfluence.methods import make_simulator
from simfluence.runlog import RunSet
from simfluence.task import Task
from simfluence.training import generate_runs

N_POOL, N_TEST, SEQ_LEN, VOCAB, LR = 24, 6, 8, 50, 0.5
CONFIG = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")  # a deprecation inside Lightning itself


def make_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(CONFIG)


def lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_losses(outputs.logits, labels)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_lm(0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return sgd(self.parameters())


@pytest.fixture
def tokens():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, VOCAB, (N_POOL, SEQ_LEN), generator=generator)
    test = torch.randint(0, VOCAB, (N_TEST, SEQ_LEN), generator=generator)
    labels = pool.clone()
    labels[:, 0] = -100
    yield {"pool": pool, "labels": labels, "test": test}
    torch.set_num_threads(threads)


def test_lightning_runs_with_accumulation_match_the_plain_loop_then_fit_and_query(tokens, tmp_path):
    curricula = random_curricula(3, N_POOL, 4, 6, subset_size=16, seed=0)
    task = Task(make_lm, tokens["pool"], tokens["labels"], tokens["test"], tokens["test"], lm_loss, sgd,
                lambda step: LR)
    plain = generate_runs(task, curricula, tmp_path / "plain", workers=1, progress=False)

    dataset = IndexedDataset([{"input_ids": tokens["pool"][i], "labels": tokens["labels"][i]} for i in range(N_POOL)])
    probe = ProbeSet({"input_ids": tokens["test"], "labels": tokens["test"]})
    for index, curriculum in enumerate(curricula):
        callback = SimfluenceLightningCallback(tmp_path / "pl", f"run-{index:03d}",
                                               lambda module: probe(module.model), test_ids=range(N_TEST),
                                               log_every=2)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])
        trainer.fit(TinyLM(), curriculum_dataloader(dataset, curriculum, micro_batches=2))
    logged = RunSet.load(tmp_path / "pl")

    for real, mine in zip(plain, logged, strict=True):
        assert mine.curriculum == real.curriculum
        assert np.allclose(mine.learning_rates, LR)
        assert mine.logged_steps.tolist() == [0, 2, 4, 6]
        assert np.allclose(np.asarray(mine.losses), np.asarray(real.losses)[mine.logged_steps], atol=1e-5)
        assert mine.metadata["accumulate_grad_batches"] == 2

    simulator = make_simulator("linear_mom").fit(logged)
    effects = loo_effects(simulator, logged[0])
    assert effects.effects.shape == (N_POOL, N_TEST) and np.isfinite(effects.effects).all()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "simfluence.integrations.lightning", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=r"pip install 'simfluence\[lightning\]'"):
        importlib.import_module("simfluence.integrations.lightning")


def test_both_callbacks_take_the_recording_options_defined_once():
    """The HF and Lightning callbacks share one definition of their options (RecordingOptions): same names,
    same defaults, each adding only its own; and the keyword arguments users pass keep working."""
    import dataclasses
    import inspect

    from simfluence.integrations._recording import RecordingOptions
    from simfluence.integrations.huggingface import SimfluenceCallback

    shared = [field.name for field in dataclasses.fields(RecordingOptions)]
    assert shared == ["runset", "run_name", "probe", "n_pool", "pool_ids", "test_ids", "log_every", "metadata",
                      "runset_metadata", "overwrite", "id_column"]
    for callback, own in ((SimfluenceCallback, ["checkpoint_steps"]), (SimfluenceLightningCallback, ["ids_of"])):
        assert issubclass(callback, RecordingOptions)
        assert list(inspect.signature(callback).parameters) == shared + own
    def probe(module):
        return np.zeros(2)

    callback = SimfluenceLightningCallback(runset="somewhere", run_name="r", probe=probe, log_every=3,
                                           id_column="ids", ids_of=None)
    assert (callback.log_every, callback.id_column, callback.recorder.log_every) == (3, "ids", 3)
    assert callback != SimfluenceLightningCallback(runset="somewhere", run_name="r", probe=probe)  # identity
