"""Shared by the benchmark scripts: record a result section in benchmarks/RESULTS.md.

Each script owns one ``## `` section; re-running it replaces that section and keeps every other one.
"""
from __future__ import annotations

from pathlib import Path

RESULTS_HEADER = """# Benchmark results

Speed and accuracy results recorded by the scripts in `benchmarks/`. Each script owns one `##`
section below and replaces only that section when it is re-run; every section records the date, the
machine, the exact command and the problem sizes, so a number can always be traced back to the run
that produced it. Timings come from shared machines and are indicative, not exact.
"""


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section headed ``title`` in ``path`` (or append it), atomically."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new.rstrip("\n") + "\n")
    tmp.replace(path)
