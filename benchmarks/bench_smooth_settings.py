"""Metasmoothness of the default and candidate smooth training settings of digits and facts (issue 18.3).

The smooth recipes (``simfluence.workloads.digits.SMOOTH``, ``simfluence.workloads.facts.SMOOTH``) are chosen by
this table: the metasmoothness score (:func:`simfluence.attribution.smoothness.metasmoothness`, Engstrom et al.
2025 def. 2, h = 0.1, ``--directions`` random directions), not by LDS. Each setting's base run is the first run
its generator would train (``random_runs_plan``: a random half of the pool in shuffled epochs). One knob is
changed at a time from the default (optimizer epsilon inside the square root, batch size), then together.

Usage::

    python benchmarks/bench_smooth_settings.py                       # every setting, recorded in RESULTS.md
    python benchmarks/bench_smooth_settings.py --settings digits digits-smooth --no-record
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import tempfile
from pathlib import Path

import torch

from simfluence.attribution.smoothness import metasmoothness
from simfluence.training import random_runs_plan
from simfluence.workloads import digits, facts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Smooth training settings: metasmoothness of default and smooth recipes"


def _digits(optimizer: str = "sgd", eps_root: float = 0.0, batch_size: int = 8):
    def build(_workdir: Path):
        return digits.digits_task(optimizer=optimizer, eps_root=eps_root), 200, batch_size, 0.5
    return build


def _facts(tier: str, batch_size: int | None = None, eps_root: float | None = None, eps: float | None = None,
           n_steps: int | None = None, lr: float | None = None):
    def build(workdir: Path):
        settings = facts.TIERS[tier]
        changes = {"batch_size": batch_size, "eps_root": eps_root, "n_steps": n_steps, "lr": lr}
        settings = dataclasses.replace(settings, **{key: value for key, value in changes.items() if value is not None})
        task = facts.facts_task(settings)
        task.metadata.pop("corpus")
        # pretraining depends on the world, model and pretraining fields only: every variant of a tier shares the
        # tier's base (the same weights its own key would pretrain), pretrained once
        base_tier = tier.removesuffix("-smooth")
        task = dataclasses.replace(task, make_model=functools.partial(
            facts.pretrained_base, settings=facts.TIERS[base_tier], data_seed=0, pretrain_seed=0,
            cache=str(workdir / f"facts-{base_tier}-base.pt")))
        if eps is not None:  # torch's AdamW with a larger eps outside the square root, for comparison
            task = dataclasses.replace(task, make_optimizer=functools.partial(
                torch.optim.AdamW, lr=0.0, eps=eps, weight_decay=settings.weight_decay))
        return task, settings.n_steps, settings.batch_size, settings.subset_fraction
    return build


D, F, FACTS = digits.SMOOTH, facts.SMOOTH, facts.TIERS["default"]
# name -> (description, factory(workdir) -> (task, n_steps, batch_size, subset_fraction), large)
# large: a default-size facts fine-tune (minutes per replay), measured with --large-directions
SETTINGS = {
    "digits": ("digits MLP, SGD momentum 0.9, batch 8 (default)", _digits(), False),
    "digits-adam": ("digits MLP, torch Adam eps 1e-8, batch 8", _digits("adam"), False),
    "digits-adam-root": ("digits MLP, Adam eps_root 1e-6, batch 8", _digits("adam", 1e-6), False),
    "digits-adam-b32": ("digits MLP, torch Adam eps 1e-8, batch 32", _digits("adam", 0.0, 32), False),
    "digits-sgd-b32": ("digits MLP, SGD momentum 0.9, batch 32", _digits("sgd", 0.0, 32), False),
    "digits-sgd-b64": ("digits MLP, SGD momentum 0.9, batch 64", _digits("sgd", 0.0, 64), False),
    "digits-adam-root-b32": ("digits MLP, Adam eps_root 1e-6, batch 32", _digits("adam", 1e-6, 32), False),
    "digits-adam-root4-b32": ("digits MLP, Adam eps_root 1e-4, batch 32", _digits("adam", 1e-4, 32), False),
    "digits-adam-root-b64": ("digits MLP, Adam eps_root 1e-6, batch 64", _digits("adam", 1e-6, 64), False),
    "digits-smooth": ("digits --smooth: " + ", ".join(f"{key} {value}" for key, value in D.items()),
                      _digits(D["optimizer"], D["eps_root"], D["batch_size"]), False),
    "facts-mini": ("facts mini, AdamW eps 1e-8, batch 8 (default)", _facts("mini"), False),
    "facts-mini-smooth": ("facts mini --smooth (tier mini-smooth)", _facts("mini-smooth"), False),
    "facts": (f"facts default, AdamW eps 1e-8, batch 8, {FACTS.n_steps} steps (default)", _facts("default"), True),
    "facts-eps-outside": ("facts default, torch AdamW eps 1e-6 (outside the sqrt), batch 8",
                          _facts("default", eps=1e-6), True),
    "facts-root": ("facts default, AdamW eps_root 1e-6, batch 8", _facts("default", eps_root=1e-6), True),
    "facts-root-b32": (f"facts default, AdamW eps_root 1e-6, batch 32, {FACTS.n_steps} steps",
                       _facts("default", batch_size=32, eps_root=1e-6), True),
    "facts-root-b32-short": (f"facts default, AdamW eps_root 1e-6, batch 32, {FACTS.n_steps // 4} steps at 4x the "
                             "learning rate (the default's examples and compute)",
                             _facts("default", batch_size=32, eps_root=1e-6, n_steps=FACTS.n_steps // 4,
                                    lr=4 * FACTS.lr), True),
    "facts-smooth": ("facts --smooth (tier default-smooth): " + ", ".join(f"{key} {value}" for key, value in F.items()),
                     _facts("default-smooth"), True),
}


def measure(name: str, workdir: Path, n_directions: int) -> dict:
    description, build, _large = SETTINGS[name]
    task, n_steps, batch_size, subset_fraction = build(workdir)
    task, curricula = random_runs_plan(task, 1, n_steps, batch_size, subset_fraction, 0)
    report = metasmoothness(task, curricula[0], n_directions=n_directions)
    return {"name": name, "description": description, "score": report.score, "scores": report.scores,
            "loss": float(report.loss_scores.mean()), "seconds": report.seconds, "replays": report.n_replays}


def table(rows: list[dict]) -> str:
    lines = ["| setting | what | metasmoothness | per direction | on test losses | replays | seconds |",
             "|---|---|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['description']} | {row['score']:.3f} | "
                     f"{', '.join(f'{s:.3f}' for s in row['scores'])} | {row['loss']:.3f} | {row['replays']} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--directions", type=int, default=3)
    parser.add_argument("--large-directions", type=int, default=1, help="directions of default-size facts settings")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the facts bases")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.settings:
            rows.append(measure(name, workdir, args.large_directions if SETTINGS[name][2] else args.directions))
            print(f"{name}: metasmoothness {rows[-1]['score']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    text = table(rows)
    print(text)
    if args.no_record:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"Recorded {stamp} by `python benchmarks/bench_smooth_settings.py --directions {args.directions} "
             f"--large-directions {args.large_directions} --settings {' '.join(args.settings)}` on "
             f"{os.cpu_count()} cores, one torch thread, load average "
             f"before {load_before:.2f}. Metasmoothness (1 = smooth, about 0 = chaotic) of the first run each "
             "setting's generator would train, replayed in float64 with data weights 1, 1 + h v, 1 + 2h v per "
             "direction v (h = 0.1). The recipes: `generate digits --smooth` is digits-smooth "
             f"({digits.SMOOTH}), `generate facts --smooth` fine-tunes with {facts.SMOOTH}. "
             "See docs/smooth_training.md.")
    write_section(args.results, SECTION, f"{SECTION}\n\n{intro}\n\n{text}\n")


if __name__ == "__main__":
    main()
