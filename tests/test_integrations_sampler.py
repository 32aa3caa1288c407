"""The curriculum sampler, the id column and the framework-free step recorder (torch only, no trainer)."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

from simfluence.curriculum import Curriculum, random_curricula, shuffled_epochs
from simfluence.errors import CurriculumError, RunLogError
from simfluence.integrations import CurriculumBatchSampler, IndexedDataset, batch_ids, curriculum_dataloader
from simfluence.integrations._recording import IdTap, StepRecorder, interleave
from simfluence.runlog import RunLogger, RunSet


@pytest.fixture
def ragged() -> Curriculum:
    return Curriculum.from_batches([[0, 1, 2, 3, 4], [5, 5, 6], [7, 8, 9, 1], [2, 3]], n_pool=10)


def test_sampler_yields_each_steps_batch_in_order(ragged):
    batches = list(CurriculumBatchSampler(ragged))
    assert batches == [batch.tolist() for batch in ragged.batches()]
    assert len(CurriculumBatchSampler(ragged)) == ragged.n_steps


def test_micro_batches_of_a_step_are_its_batch_split_like_array_split(ragged):
    sampler = CurriculumBatchSampler(ragged, micro_batches=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 * ragged.n_steps
    for step, batch in enumerate(ragged.batches(), 1):
        first, second = batches[2 * step - 2], batches[2 * step - 1]
        assert first + second == batch.tolist()
        assert [len(first), len(second)] == [len(part) for part in np.array_split(batch, 2)]
        assert sampler.step_of(2 * step - 2) == sampler.step_of(2 * step - 1) == step


def test_replicas_share_every_step_and_match_trainer_sharding(ragged):
    """Rank r of P gets chunks m * P + r: what Trainer's batch-sampler sharding (batch i to rank i % P) gives."""
    per_rank = [list(CurriculumBatchSampler(ragged, micro_batches=1, num_replicas=2, rank=rank)) for rank in (0, 1)]
    flat = list(CurriculumBatchSampler(ragged, micro_batches=2))
    assert per_rank[0] == flat[0::2] and per_rank[1] == flat[1::2]
    for step, batch in enumerate(ragged.batches()):
        gathered = interleave([[np.array(per_rank[rank][step])] for rank in (0, 1)])
        assert gathered.tolist() == batch.tolist()


def test_a_step_smaller_than_its_micro_batches_is_an_error_naming_it(ragged):
    with pytest.raises(CurriculumError, match="step 4 .* 2 example"):
        CurriculumBatchSampler(ragged, micro_batches=3)
    with pytest.raises(CurriculumError, match="rank"):
        CurriculumBatchSampler(ragged, num_replicas=2, rank=2)
    with pytest.raises(CurriculumError, match="micro_batches"):
        CurriculumBatchSampler(ragged, micro_batches=0)


def test_random_curricula_train_through_a_dataloader_with_their_ids():
    features = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    dataset = IndexedDataset(torch.utils.data.TensorDataset(features, features.sum(1)))
    for curriculum in [*random_curricula(2, 20, 4, 7, subset_size=10, seed=1), shuffled_epochs(20, 3, 9, seed=2)]:
        loader = curriculum_dataloader(dataset, curriculum)
        seen = [batch_ids(batch).tolist() for batch in loader]
        assert seen == [batch.tolist() for batch in curriculum.batches()]
        x, _, ids = next(iter(loader))
        assert torch.equal(x, features[ids])


def test_indexed_dataset_adds_the_position_to_any_example():
    dataset = IndexedDataset([{"text": "a"}, (1, 2), 7.0], id_column="pos")
    assert dataset[0] == {"text": "a", "pos": 0}
    assert dataset[1] == (1, 2, 1)
    assert dataset[2] == (7.0, 2)
    batch = torch.utils.data.default_collate([IndexedDataset([{"x": torch.ones(2)}] * 3)[i] for i in (2, 0)])
    assert batch_ids(batch).tolist() == [2, 0]
    with pytest.raises(KeyError, match="IndexedDataset"):
        batch_ids({"x": torch.ones(2)})


def test_curriculum_dataloader_rejects_ids_beyond_the_dataset():
    with pytest.raises(CurriculumError, match="pool id 9"):
        curriculum_dataloader(list(range(5)), Curriculum.from_batches([[9]]))


def test_id_tap_strips_the_column_and_reports_training_forwards_only():
    class Needy(nn.Module):
        def forward(self, x):  # would fail on an unexpected keyword
            return x * 2

    model, seen = Needy(), []
    tap = IdTap.on(model, "simfluence_id")
    assert IdTap.on(model, "simfluence_id") is tap
    tap.listeners.append(seen.append)
    model.train()
    assert torch.equal(model(x=torch.ones(2), simfluence_id=torch.tensor([3, 4])), torch.full((2,), 2.0))
    model.eval()
    model(x=torch.ones(1), simfluence_id=torch.tensor([5]))
    assert [ids.tolist() for ids in seen] == [[3, 4]]


def _log_fake_run(path, rank: int, world_size: int, steps: list[list[list[int]]], log_every: int) -> None:
    """Feed ``steps`` (per step, this rank's micro-batches) through a StepRecorder; rank 0 owns the logger."""
    model = nn.Linear(1, 1)
    probe_calls = []

    def probe(module: nn.Module) -> np.ndarray:
        probe_calls.append(1)
        return np.full(2, float(len(probe_calls)))

    recorder = StepRecorder(probe, log_every=log_every)
    logger = RunLogger(path, "run-0") if rank == 0 else None
    recorder.start(model, logger)
    for step, micro_batches in enumerate(steps, 1):
        for ids in micro_batches:
            recorder.add_micro_batch(torch.tensor(ids))
        recorder.end_step(step, 0.1 * step, model)
    recorder.finish(model)


def test_step_recorder_logs_steps_learning_rates_and_probe_every_k(tmp_path):
    RunSet.create(tmp_path, n_pool=10, test_ids=2)
    steps = [[[0, 1], [2]], [[3], [4, 5]], [[6], [7]]]
    _log_fake_run(tmp_path, 0, 1, steps, log_every=2)
    run = RunSet.load(tmp_path)[0]
    assert [batch.tolist() for batch in run.curriculum.batches()] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert np.allclose(run.learning_rates, [0.1, 0.2, 0.3])
    assert run.logged_steps.tolist() == [0, 2, 3]
    assert np.allclose(np.asarray(run.losses)[:, 0], [1, 2, 3])


def test_step_without_ids_is_an_error_that_says_how_to_add_them():
    recorder = StepRecorder(lambda model: np.zeros(1))
    recorder.start(nn.Linear(1, 1), None)
    with pytest.raises(RunLogError, match="IndexedDataset"):
        recorder.end_step(1, 0.1, nn.Linear(1, 1))


def _gloo_worker(rank: int, world_size: int, port: int, path: str, steps_per_rank: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _log_fake_run(path, rank, world_size, steps_per_rank[rank], log_every=2)
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)  # no destructors after the gloo group: its teardown can deadlock on the GIL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_are_gathered_on_rank0_in_curriculum_order(tmp_path, spawn_with_timeout):
    curriculum = Curriculum.from_batches([[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]], n_pool=10)
    steps_per_rank = []
    for rank in (0, 1):
        chunks = list(CurriculumBatchSampler(curriculum, micro_batches=2, num_replicas=2, rank=rank))
        steps_per_rank.append([chunks[2 * step : 2 * step + 2] for step in range(curriculum.n_steps)])
    RunSet.create(tmp_path, n_pool=10, test_ids=2)
    spawn_with_timeout(_gloo_worker, (2, _free_port(), str(tmp_path), steps_per_rank), nprocs=2, timeout=60)
    run = RunSet.load(tmp_path)[0]
    assert run.curriculum == curriculum
    assert run.logged_steps.tolist() == [0, 2, 3]


def test_a_write_error_on_the_background_thread_reaches_the_training_thread(tmp_path):
    RunSet.create(tmp_path, n_pool=5, test_ids=1)
    recorder = StepRecorder(lambda model: np.zeros(1), log_every=10)
    model = nn.Linear(1, 1)
    recorder.start(model, RunLogger(tmp_path, "run-0"))
    recorder.add_micro_batch([7])  # outside the pool of 5
    recorder.end_step(1, 0.1, model)
    with pytest.raises(RunLogError, match="pool position 7"):
        recorder.finish(model)
