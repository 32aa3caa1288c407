"""Benchmark: wall time of ``simfluence demo`` from an empty output folder (target: <= 3 minutes on 2 cores).

Runs the demo in a subprocess (the same command ``make demo`` runs), so generation of the 48 digits runs,
fitting every method, evaluation, plots and the report are all included. Prints a markdown table of the wall
time and of the demo's held-out metrics (its ``metrics.json``: the table the README quotes) and records both
in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_demo.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Demo: wall time of `simfluence demo` (make demo)"
TARGET_SECONDS = 180.0


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from simfluence.metrics import format_markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    executable = Path(sys.executable).with_name("simfluence")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "demo-out"
        start = time.perf_counter()
        subprocess.run([str(executable), "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        files = sorted(p.name for p in out.iterdir() if p.is_file())
    fits = ", ".join(f"{name} {scores['fit_seconds']:.1f} s" for name, scores in metrics.items())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "meets" if seconds <= TARGET_SECONDS else "MISSES"
    section = "\n".join([
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_demo.py` on {os.cpu_count()} cores ({platform.machine()}), "
        f"load average before {load_before[0]:.2f}.",
        "",
        "| what | value |",
        "|---|---|",
        f"| wall time from an empty folder (48 runs trained, {len(metrics)} methods fitted, report, plots) "
        f"| **{seconds:.0f} s** |",
        f"| target | <= {TARGET_SECONDS:.0f} s ({verdict}) |",
        f"| fit time per method | {fits} |",
        f"| files written | {', '.join(files)} |",
        "",
        "The demo's held-out metrics (48 digits runs, fitted on the first 40, scored on the last 8; `metrics.json`):",
        "",
        format_markdown_table({name: {key: (np.nan if value is None else value) for key, value in scores.items()}
                               for name, scores in metrics.items()}),
        "",
    ])
    print(section)
    if not args.no_record:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
