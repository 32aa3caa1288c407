"""Benchmark: the cost of logging a Hugging Face ``Trainer`` run with ``SimfluenceCallback``.

A GPT-2 built from a config is fine-tuned on random tokens for one curriculum (``CurriculumTrainer``, SGD,
gradient accumulation 2) with and without the callback. The callback's probe is a stub returning constant
losses, so the difference is the logging itself (id hook, per-step bookkeeping, ``RunLogger`` writes, a loss
row every step); the probe evaluation (``ProbeSet`` on the probe examples) is timed on its own. Step time is
the median over repeats of (time from the end of step 5 to the end of the last step) / steps, measured by a
callback registered last; configurations alternate within each repeat so that load drifts hit all alike, and
the paired median compares the two runs of each repeat. On a shared machine those differences are noisy, so
the time spent inside the callback's step events (training thread; ``RunLogger`` writes run on a background
thread) is also reported directly. Prints a markdown table and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_integrations.py [--steps 60] [--repeats 5]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from simfluence.curriculum import Curriculum, shuffled_epochs
from simfluence.integrations import ProbeSet
from simfluence.integrations.huggingface import CurriculumTrainer, SimfluenceCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Hugging Face integration: SimfluenceCallback overhead per optimizer step"

WARMUP_STEPS = 5
SIZES = {  # name: (n_layer, n_embd, seq_len, examples per step)
    "tiny": (2, 64, 32, 8),
    "small": (4, 128, 64, 16),
}


class StepClock(TrainerCallback):
    """Time stamp at the end of every optimizer step (registered last: after every other callback's work)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class TimedCallback(SimfluenceCallback):
    """SimfluenceCallback that adds up the time spent in its step events (in the training thread)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        self.steps = 0

    def on_step_begin(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_step_begin(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def on_step_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_step_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.steps += 1


class StubProbe:
    """Constant losses: the callback's logging without any probe evaluation."""

    def __init__(self, n_probe: int) -> None:
        self.losses = np.ones(n_probe)

    def __len__(self) -> int:
        return self.losses.size

    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        return self.losses


def seconds_per_step(config: GPT2Config, pool: list[dict], curriculum: Curriculum, output: Path,
                     callback: SimfluenceCallback | None) -> float:
    """Train one run; the mean time per optimizer step after the first WARMUP_STEPS steps."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    clock = StepClock()
    args = TrainingArguments(output_dir=str(output), gradient_accumulation_steps=2, learning_rate=0.1,
                             lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = CurriculumTrainer(model=model, args=args, train_dataset=pool, curriculum=curriculum,
                                optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                                callbacks=[*([callback] if callback else []), clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return (clock.ends[-1] - clock.ends[WARMUP_STEPS - 1]) / (len(clock.ends) - WARMUP_STEPS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-probe", type=int, default=64)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    options = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for size, (n_layer, n_embd, seq_len, step_size) in SIZES.items():
            config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=512, n_positions=seq_len,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            generator = torch.Generator().manual_seed(0)
            n_pool = 8 * step_size
            tokens = torch.randint(0, 512, (n_pool + options.n_probe, seq_len), generator=generator)
            pool = [{"input_ids": tokens[i], "labels": tokens[i]} for i in range(n_pool)]
            curriculum = shuffled_epochs(n_pool, step_size, options.steps, seed=0)

            without, logged, inside = [], [], []
            for repeat in range(options.repeats):
                without.append(seconds_per_step(config, pool, curriculum, scratch / "out", None))
                callback = TimedCallback(scratch / size, f"r{repeat}", StubProbe(options.n_probe), log_every=1)
                logged.append(seconds_per_step(config, pool, curriculum, scratch / "out", callback))
                inside.append(callback.seconds / callback.steps)
            probe = ProbeSet({"input_ids": tokens[n_pool:], "labels": tokens[n_pool:]}, batch_size=64)
            model = GPT2LMHeadModel(config)
            probe(model)
            probe_seconds = []
            for _ in range(options.repeats):
                start = time.perf_counter()
                probe(model)
                probe_seconds.append(time.perf_counter() - start)
            base, with_callback = float(np.median(without)), float(np.median(logged))
            paired = float(np.median(np.array(logged) / np.array(without) - 1.0))
            callback_seconds = float(np.median(inside))
            rows.append((size, f"{n_layer}x{n_embd}, seq {seq_len}, {step_size}/step", base * 1e3,
                         with_callback * 1e3, 100 * (with_callback / base - 1), 100 * paired,
                         callback_seconds * 1e3, 100 * callback_seconds / base,
                         float(np.median(probe_seconds)) * 1e3))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_integrations.py --steps {options.steps} --repeats "
        f"{options.repeats}` on {os.cpu_count()} cores, load average before {load_before:.2f}: `CurriculumTrainer` "
        f"(GPT-2 from a config, SGD, gradient accumulation 2, 1 torch thread; torch {torch.__version__}, "
        f"transformers {transformers.__version__}), {options.steps} steps, median of {options.repeats} repeats, the "
        f"probe stubbed in the timed runs (its own cost, {options.n_probe} examples, in the last column). Target: "
        "the logging itself <= 5% of a step.",
        "",
        "| model | GPT-2 | step without (ms) | step with callback (ms) | difference (%) | paired median (%) "
        "| in callback (ms/step) | in callback (% of step) | probe evaluation (ms, separate) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {size} | {shape} | {base:.2f} | {with_callback:.2f} | {percent:+.1f} | {paired:+.1f} "
          f"| {inside_ms:.3f} | {inside_percent:.1f} | {probe_ms:.1f} |"
          for size, shape, base, with_callback, percent, paired, inside_ms, inside_percent, probe_ms in rows],
        "",
        "*in callback* is the time spent inside the callback's hooks (the part the target is about); the wall-clock "
        "difference also holds the background writer's disk commits competing for the 2 cores, and swings between "
        "runs on a shared machine.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not options.no_record:
        write_section(options.results, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
