"""Every code block of README.md and docs/*.md runs, and every result number in them is one that
benchmarks/RESULTS.md records.

Each page runs in a fresh temporary folder holding copies of the committed ``runs/digits-mini`` set and of
``examples/``; its ``python`` blocks run in order in one namespace (a page's blocks continue each other's
session), its ``bash`` blocks line by line: ``simfluence ...`` through ``simfluence.cli.main`` (exit status
0 required). Commands written for the full-size sets are shrunk with their own documented flags (``SHRINK``):
the default digits run set becomes the mini set, generated run sets get few, short runs, verification few
edits. A block that cannot run here is marked by ``<!-- skip-test: reason -->`` on the line before it; the
reasons are printed by ``test_skipped_blocks_are_few_and_justified``. ``text`` blocks are output, not code.
"""
from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from simfluence.methods import DEFAULT_METHODS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MAX_SKIPPED = 12  # blocks that need a GPU, a Ray cluster, a Hugging Face fine-tune or minutes of training
RUNNABLE = {"python", "bash"}
NOT_CODE = {"text"}

_FENCE = re.compile(r"(?:^<!-- skip-test: (?P<skip>.*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\n", re.S | re.M)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text.count("\n", 0, match.start("body")), match.group("lang"), match.group("body"),
                  match.group("skip")) for match in _FENCE.finditer(text)]


# ------------------------------------------------------------------------------------------ shell lines
# Full-size commands -> the committed mini set, and sizes cut with the commands' own flags.
PATHS = {"runs/digits": "runs/digits-mini", "my_task.py:make_task": "examples/wine_task.py:make_task"}
RUN_NAMES = {"run-040": "run-020", "run-043": "run-021", "run-047": "run-023", "run-031": "run-007"}
SHRINK = {  # (command, option) -> largest value used in the test; appended where the default is larger
    ("generate", "--runs"): 8, ("generate", "--steps"): 20, ("verify", "--k"): 3,
    ("simulate", "--intervals"): 3, ("whatif", "--intervals"): 3, ("loo", "--intervals"): 3,
    ("search", "--intervals"): 3,
}
DEFAULT_ABOVE_CAP = {("generate", "--runs"), ("generate", "--steps"), ("verify", "--k")}
ADD = {"generate": ["--workers", "1"], "verify": ["--workers", "1"]}  # train in this process: no worker start-up
# The lam (and momentum) the validation search picks on the mini set, fixed: each fit in a tenth of the time.
FIXED = {"linear_mom": ["lam=0.01", "momentum=0.8"], "linear_step": ["lam=0.01"]}
LDS_ADD = ["--bases", "1", "--protocols", "remove-5", "--methods", "mean_curve,linear_mom", "--draws", "3"]


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def shrink(words: list[str]) -> list[str]:
    command = words[1] if len(words) > 1 else ""
    paths = {} if command == "generate" else PATHS  # a generated set keeps its folder, with fewer, shorter runs
    args = [RUN_NAMES.get(word, paths.get(word, word)) for word in words[1:]]
    args = [PATHS.get(word, word) if word.endswith(":make_task") else word for word in args]
    for (shrunk, name), limit in SHRINK.items():
        if shrunk != command:
            continue
        if name in args and args[args.index(name) + 1].isdigit():
            args[args.index(name) + 1] = str(min(int(args[args.index(name) + 1]), limit))
        elif name not in args and (command, name) in DEFAULT_ABOVE_CAP:
            args += [name, str(limit)]
    args += ADD.get(command, [])
    if command == "verify" and option(args, "--protocol") == "lds":
        return args + LDS_ADD  # click keeps an option's last value
    given = " ".join(args)
    if command in ("fit", "verify") and option(args, "--method", "linear_mom") == "linear_mom":
        args += [word for param in FIXED["linear_mom"] if param.split("=")[0] + "=" not in given
                 for word in ("--param", param)]
    if command == "evaluate":
        methods = option(args, "--methods", ",".join(DEFAULT_METHODS)).split(",")
        args += [word for method in methods for param in FIXED.get(method, [])
                 if f"{method}.{param.split('=')[0]}=" not in given for word in ("--param", f"{method}.{param}")]
    return args


def shell_lines(body: str) -> list[list[str]]:
    joined = body.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def run_shell(block: Block) -> None:
    from simfluence.cli import main

    for words in shell_lines(block.body):
        assert words[0] == "simfluence", (
            f"{block.where}: `{' '.join(words)}` is not a simfluence command; mark the block skip-test with a reason")
        args = shrink(words)
        assert main(args) == 0, f"{block.where}: simfluence {' '.join(args)} failed"


# ------------------------------------------------------------------------------------------ running pages
@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread while the docs run: on 2 shared cores torch's threaded sparse products made a page's
    fits (Bootstrap on the mini set) about 5x slower than one thread. The pages are run, not timed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_page(page: Path, tmp_path: Path, monkeypatch) -> dict:
    shutil.copytree(ROOT / "runs" / "digits-mini", tmp_path / "runs" / "digits-mini")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.skip is not None:
            continue
        if block.lang == "python":
            code = "\n" * (block.line - 1) + block.body  # tracebacks point at the page's own lines
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - the docs are ours
        elif block.lang == "bash":
            run_shell(block)
    return namespace


def test_every_block_is_runnable_text_or_skipped_with_a_reason():
    for page in PAGES:
        text = page.read_text()
        assert text.count("\n```") % 2 == 0, f"{page.name}: unbalanced code fences"
        for block in blocks(page):
            assert block.lang in RUNNABLE | NOT_CODE, f"{block.where}: code block language {block.lang!r}"
            if block.skip is not None:
                assert block.skip.strip(), f"{block.where}: skip-test without a reason"
        n_fences = len(re.findall(r"^```[\w-]*$", text, re.M)) // 2
        assert n_fences == len(blocks(page)), f"{page.name}: a code block the test does not see"


def test_skipped_blocks_are_few_and_justified():
    skipped = [block for page in PAGES for block in blocks(page) if block.skip is not None]
    for block in skipped:
        print(f"skipped {block.where} ({block.lang}): {block.skip}")
    assert len(skipped) <= MAX_SKIPPED


def test_the_skipped_hugging_face_commands_are_those_its_own_test_runs():
    """docs/huggingface.md's fine-tune commands are skipped here because tests/test_integrations_huggingface.py
    runs them (from the docstring of examples/hf_finetune.py, with 4 runs of 6 steps): they must be the same."""
    import ast

    example = ast.get_docstring(ast.parse((ROOT / "examples" / "hf_finetune.py").read_text()))
    wanted = [shlex.split(line) for line in example.splitlines()
              if line.strip().startswith(("python examples/hf_finetune.py", "simfluence "))]
    page = ROOT / "docs" / "huggingface.md"
    documented = next(block for block in blocks(page) if "hf_finetune.py --runs" in block.body)
    assert documented.skip is not None and shell_lines(documented.body) == wanted


def test_readme_quickstarts_run_and_do_what_they_say(tmp_path, monkeypatch, capsys):
    namespace = run_page(ROOT / "README.md", tmp_path, monkeypatch)
    assert namespace["curves"].shape[0] == 3
    assert (tmp_path / "linear_mom.npz").exists()
    assert "rho_runs" in capsys.readouterr().out
    assert (tmp_path / "model.npz").exists()  # the CLI quickstart's fit

    # The search lowers its targets' predicted final loss by removing at most ``drop`` examples, and the
    # change it reports is what re-simulating the curriculum it found gives.
    quickstart = next(block.body for block in blocks(ROOT / "README.md") if "search_curriculum(" in block.body)
    call = re.search(r"search_curriculum\(.*?tests=\[([^\]]*)\].*?drop=(\d+)", quickstart)
    targets, drop = [int(test) for test in call.group(1).split(",")], int(call.group(2))
    runset, sim, run, best = namespace["runset"], namespace["sim"], namespace["run"], namespace["best"]
    assert best.predicted_change < 0
    assert 1 <= len(best.removed) <= drop
    removed = runset.pool_positions(best.removed)
    assert (run.curriculum.counts(runset.n_pool)[removed] > 0).all()
    assert (best.curriculum.counts(runset.n_pool)[removed] == 0).all()
    columns = runset.test_positions(targets)
    curves = np.asarray(sim.simulate([run.curriculum, best.curriculum], run.initial_losses))
    before, after = curves[:, -1, columns].mean(axis=1)
    assert after - before == pytest.approx(best.predicted_change, rel=1e-6, abs=1e-12)


def check_logging_runs(namespace: dict, tmp_path: Path) -> None:
    """The page's logging loop, import and Task do what the page says they do."""
    import torch

    from simfluence import RunSet
    from simfluence.task import load_task

    logged = RunSet.load(tmp_path / "runs" / "my-task")
    assert len(logged) == 3 and logged[0].n_steps == 10 and list(logged.test_ids) == ["q0", "q1", "q2", "q3"]
    mini, imported = RunSet.load(ROOT / "runs" / "digits-mini"), RunSet.load(tmp_path / "runs" / "imported")
    assert len(imported) == len(mini) and np.allclose(imported[3].losses, mini[3].losses)
    task, example = namespace["task"], load_task(f"{ROOT / 'examples' / 'wine_task.py'}:make_task")
    assert task.n_pool == 148 and task.n_test == 30 and task.test_ids[3] == "w3"
    assert task.pool_ids == example.pool_ids and torch.equal(task.pool_inputs, example.pool_inputs)  # in sync


CHECKS = {"logging-runs.md": check_logging_runs}


@pytest.mark.parametrize("page", [page for page in PAGES if page.name != "README.md"], ids=lambda page: page.name)
def test_docs_page_code_runs(page, tmp_path, monkeypatch):
    namespace = run_page(page, tmp_path, monkeypatch)
    if page.name in CHECKS:
        CHECKS[page.name](namespace, tmp_path)


# ------------------------------------------------------------------------------------------ numbers
_NUMBER = re.compile(r"(?<![\w.\-/])-?\d+\.\d+(?:e-?\d+)?(?![\w.]*\d)")


def prose(text: str) -> str:
    """The page without code blocks, inline code and link targets (numbers there are settings, not results)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def recorded(value: str, results: list[str]) -> bool:
    decimals = len(value.split(".")[1].split("e")[0])
    target = abs(float(value))
    for number in results:
        if "e" in value:
            if abs(abs(float(number)) - target) <= 1e-12 * max(1.0, target) or number.lstrip("-+") == value.lstrip("-"):
                return True
        elif abs(abs(float(number)) - target) <= 0.5 * 10**-decimals + 1e-12:  # rounded either way at a tie
            return True
    return False


def test_every_result_number_in_the_docs_is_recorded_in_results_md():
    results = re.findall(r"\d+\.\d+(?:e[-+]?\d+)?|\d+", RESULTS.read_text().replace(",", ""))
    missing = [f"{page.relative_to(ROOT)}: {value}" for page in PAGES
               for value in sorted(set(_NUMBER.findall(prose(page.read_text())))) if not recorded(value, results)]
    assert not missing, "numbers not in benchmarks/RESULTS.md (link to it instead):\n" + "\n".join(missing)
