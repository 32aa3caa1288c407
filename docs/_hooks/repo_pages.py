"""MkDocs hook: Markdown files of the repository that live outside docs/ become pages of the site.

benchmarks/RESULTS.md (the result tables, owned by the benchmark scripts) and runs/README.md (the run-log
format) stay where they are, so that the scripts and GitHub keep working; the site serves them at the same
relative paths (``benchmarks/RESULTS.md``, ``runs/README.md``), and a docs page's link to them, written
relative to the page's file (``../benchmarks/RESULTS.md``, which GitHub follows), is rewritten to the page.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REPO_PAGES = ("benchmarks/RESULTS.md", "runs/README.md")
_LINK = re.compile(r"\]\(([^)#\s]+\.md)(#[^)\s]*)?\)")


def on_files(files, config):
    for path in REPO_PAGES:
        files.append(File.generated(config, path, abs_src_path=str(ROOT / path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in REPO_PAGES:
        return markdown
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target, anchor = match.group(1), match.group(2) or ""
        in_repo = (DOCS / page_dir / target).resolve()
        try:
            repo_path = in_repo.relative_to(ROOT).as_posix()
        except ValueError:
            return match.group(0)
        if repo_path not in REPO_PAGES:
            return match.group(0)
        return f"]({posixpath.relpath(repo_path, page_dir or '.')}{anchor})"

    return _LINK.sub(rewrite, markdown)
