"""Benchmark: the long fuzz run of the run-set reader and the importers (``make fuzz``), recorded.

Runs ``tests/test_fuzz.py`` with ``SIMFLUENCE_FUZZ_EXAMPLES`` random (not derandomized) inputs per test, counts
what every input ended in (a result, a ``SimfluenceError``, a one-line CLI error) and records the counts, the
tracebacks (any exception that is not the library's own) and crashes (a non-zero pytest exit) in
``benchmarks/RESULTS.md``. ``make test`` runs the same tests with a short, derandomized budget.

    python benchmarks/bench_fuzz.py [--examples 1500]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Fuzzing: mutated run sets, import tables and GPTDynamics files (make fuzz)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1500, help="inputs per fuzz test")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "fuzz.json"
        env = {**os.environ, "SIMFLUENCE_FUZZ_EXAMPLES": str(args.examples), "SIMFLUENCE_FUZZ_REPORT": str(report)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        summary = json.loads(report.read_text()) if report.is_file() else {"inputs_tried": 0, "outcomes": {}}
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_fuzz.py --examples {args.examples}` on {os.cpu_count()} cores "
        f"({seconds:.0f} s): `tests/test_fuzz.py` with {args.examples} random inputs per test.",
        "",
        "| what | value |",
        "|---|---|",
        f"| inputs tried | {summary['inputs_tried']} |",
        f"| tracebacks (an exception that is not a `SimfluenceError`, or a multi-line CLI error) | {len(failures)} |",
        f"| crashes (pytest exit status other than 0) | {int(done.returncode != 0)} (status {done.returncode}) |",
        *[f"| outcome: {outcome} | {count} |" for outcome, count in summary["outcomes"].items()],
        "",
        *([f"Failures: {'; '.join(failures)}", ""] if failures else []),
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTION, section)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
