"""The layer contract of the package (DESIGN.md section 4, issue 20): no import cycle, no arrow that runs back up.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` in
``simfluence/**/*.py``, at module level or inside a function. An import under ``if TYPE_CHECKING:`` is only an
annotation: it is exempt from the cycle check (it never runs) but still obeys the layers (a type of a higher layer
in a lower layer's signature is an arrow back up all the same). Imports through ``importlib`` with a computed name
(the lazy table of ``simfluence/__init__.py``, the method registry) are not seen; they point up, from the front
door and the registry, never down into a lower layer.

``LAYERS`` is the one table of the layers. A module belongs to the layer of the longest prefix naming it; a module
of no layer is itself a violation, so a new module is placed on purpose.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "simfluence"

# bottom-up; a module may import modules of its own layer and of the layers below it, never above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("simfluence.errors", "simfluence._io")),
    ("ids and curricula", ("simfluence.ids", "simfluence.curriculum", "simfluence.cluster")),
    ("run logs", ("simfluence.runlog", "simfluence.importers", "simfluence.synthetic")),
    ("design and solvers", ("simfluence.design", "simfluence.solvers")),
    ("simulators", ("simfluence.simulators",)),
    # torch starts here: task and training sit above the numpy-only core although DESIGN.md lists task.py earlier
    ("task", ("simfluence.task", "simfluence.optim")),  # optim: the smooth AdamW a task's make_optimizer returns
    ("training", ("simfluence.training",)),
    # EXCEPTION to DESIGN.md's order (workloads after the analysis layer): the built-in tasks sit right above the
    # engine that trains them, because attribution's fit(runset, task=None) rebuilds the built-in task a run set
    # records (simfluence.workloads.task_for_runset); workloads import nothing but task, training and the core
    ("workloads", ("simfluence.workloads",)),
    ("attribution", ("simfluence.attribution",)),
    ("analysis", ("simfluence.counterfactual", "simfluence.metrics", "simfluence.evaluation", "simfluence.uncertainty",
                  "simfluence.blend", "simfluence.methods", "simfluence.sharding")),
    ("integrations", ("simfluence.integrations",)),
    ("apps", ("simfluence.apps",)),
    ("front door", ("simfluence.cli", "simfluence.__main__", "simfluence")),  # "simfluence": the package's __init__
]
CORE = ("errors", "ids and curricula", "run logs", "design and solvers", "simulators")  # numpy only: no torch
# (importer, imported) arrows allowed against the rules above, each with its reason
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("simfluence.solvers", "torch"): "the optional torch CSR kernel of the batched solves (kernel='torch'), "
                                     "imported inside the functions that use it; numpy/scipy otherwise",
}


@dataclass(frozen=True)
class Arrow:
    """One import: ``importer`` imports ``imported`` (a module of the package, or an outside package's top name)."""

    importer: str
    imported: str
    line: int
    type_checking: bool


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Module name -> source text of every module of the package."""
    return {module_name(path, package_dir): path.read_text() for path in sorted(package_dir.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool = False):
    """(node, under TYPE_CHECKING) for every import statement, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_checking)
        else:
            yield from _imports(node, type_checking)


def import_arrows(sources: dict[str, str]) -> list[Arrow]:
    """Every import of every module in ``sources``, resolved to a module of ``sources`` or an outside top name."""
    def resolve(name: str) -> str:  # the longest known module naming it: a.b.C -> a.b
        while name not in sources and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    arrows = []
    for importer, text in sources.items():
        is_package = importer == "simfluence" or any(key.startswith(importer + ".") for key in sources)
        for node, type_checking in _imports(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    package = importer if is_package else importer.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        package = package.rsplit(".", 1)[0]
                    base = f"{package}.{base}" if base else package
                names = [f"{base}.{alias.name}" for alias in node.names] if base.split(".")[0] == "simfluence" \
                    else [base]
            for name in names:
                top = name.split(".")[0]
                target = resolve(name) if top == "simfluence" else top
                if target != importer:
                    arrows.append(Arrow(importer, target, node.lineno, type_checking))
    return arrows


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the layer holding ``module`` (longest matching prefix), or None."""
    best, best_length = None, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and "." in prefix  # "simfluence" names its __init__ only
            if (module == prefix or inside) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def cycles(arrows: list[Arrow]) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module), annotation-only imports left out."""
    graph: dict[str, set[str]] = {}
    for arrow in arrows:
        if not arrow.type_checking and arrow.imported.startswith("simfluence"):
            graph.setdefault(arrow.importer, set()).add(arrow.imported)
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's algorithm (the graph has ~70 nodes: recursion is fine)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_text(component: list[str], arrows: list[Arrow]) -> str:
    """``cycle: a -> b -> a``: one closed path through the component, from its first module."""
    members = set(component)
    edges = {}
    for arrow in arrows:
        if not arrow.type_checking and arrow.importer in members and arrow.imported in members:
            edges.setdefault(arrow.importer, set()).add(arrow.imported)
    start = component[0]
    path, seen = [start], {start}
    while True:  # walk to the module that closes the loop back to start (breadth-first would be shorter; not needed)
        successors = sorted(edges.get(path[-1], ()))
        if start in successors:
            return "cycle: " + " -> ".join([*path, start])
        unvisited = [module for module in successors if module not in seen]
        if not unvisited:
            return "cycle: " + " <-> ".join(component)
        path.append(unvisited[0])
        seen.add(unvisited[0])


def violations(sources: dict[str, str]) -> list[str]:
    """Every breach of the contract by the modules in ``sources``, one line each."""
    arrows = import_arrows(sources)
    found = [f"module {module} belongs to no layer of LAYERS" for module in sources if layer_of(module) is None]
    core = {index for index, (name, _prefixes) in enumerate(LAYERS) if name in CORE}
    for arrow in arrows:
        if (arrow.importer, arrow.imported) in EXCEPTIONS:
            continue
        where = f"{arrow.importer} (line {arrow.line}) imports {arrow.imported}"
        low, high = layer_of(arrow.importer), layer_of(arrow.imported)
        if not arrow.imported.startswith("simfluence"):
            if arrow.imported == "torch" and low in core:
                found.append(f"{where}: the core ({LAYERS[low][0]}) imports no torch")
        elif low is not None and high is not None and high > low:
            found.append(f"{where}: layer {LAYERS[low][0]!r} is below {LAYERS[high][0]!r}")
    found += [_cycle_text(component, arrows) for component in cycles(arrows)]
    return sorted(set(found))


def private_imports_across_packages(sources: dict[str, str]) -> list[str]:
    """Imports of a private name from outside the package that holds it, one line each.

    A private module (``simfluence._io``, ``simfluence.integrations._recording``) belongs to its package and all
    that package holds; a private attribute (``_x`` of module ``m``) to the modules of ``m``'s own package.
    """
    def package_of(module: str) -> str:
        is_package = module == "simfluence" or any(key.startswith(module + ".") for key in sources)
        return module if is_package else module.rsplit(".", 1)[0]

    found = []
    for importer, text in sources.items():
        for node, _type_checking in _imports(ast.parse(text)):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("simfluence"):
                continue
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}".split(".")
                for depth, part in enumerate(dotted):
                    if not part.startswith("_") or part.startswith("__"):
                        continue
                    name = ".".join(dotted[:depth + 1])
                    if name in sources:  # a private module: anything inside its package may use it
                        holder = ".".join(dotted[:depth])
                        allowed = importer == holder or importer.startswith(holder + ".")
                    else:  # a private attribute of module dotted[:depth]: only that module's package
                        allowed = package_of(importer) == package_of(".".join(dotted[:depth]))
                    if not allowed:
                        found.append(f"{importer} (line {node.lineno}) imports {name}")
                    break
    return found


# ------------------------------------------------------------------------------------------------- the contract
def test_every_module_has_a_layer_no_arrow_runs_back_up_and_there_is_no_cycle():
    found = violations(package_sources())
    assert found == [], "\n".join(found)


def test_no_private_name_is_imported_across_packages():
    assert private_imports_across_packages(package_sources()) == []


def test_the_issues_core_imports_no_torch_attribution_workloads_integrations_apps_or_cli():
    forbidden = ("torch", "simfluence.attribution", "simfluence.workloads", "simfluence.integrations",
                 "simfluence.apps", "simfluence.cli", "simfluence.task", "simfluence.training")
    core = {index for index, (name, _prefixes) in enumerate(LAYERS) if name in CORE}
    arrows = [arrow for arrow in import_arrows(package_sources())
              if layer_of(arrow.importer) in core and (arrow.importer, arrow.imported) not in EXCEPTIONS
              and any(arrow.imported == name or arrow.imported.startswith(name + ".") for name in forbidden)]
    assert arrows == []


# ------------------------------------------------------------------------------------- the checker finds a breach
def planted(module: str, text: str) -> dict[str, str]:
    """The package's sources with ``text`` appended to ``module`` (or a new module): nothing is written to disk."""
    sources = package_sources()
    sources[module] = sources.get(module, "") + "\n" + text
    return sources


def new_violations(sources: dict[str, str]) -> list[str]:
    before = set(violations(package_sources()))
    return [line for line in violations(sources) if line not in before]


def test_the_checker_fails_on_a_core_module_importing_a_higher_layer_inside_a_function():
    found = new_violations(planted("simfluence.design", "def plot_it():\n    from simfluence.apps import plot\n"))
    assert len(found) == 1 and found[0].startswith("simfluence.design (line ") and \
        "imports simfluence.apps.plot: layer 'design and solvers' is below 'apps'" in found[0]


def test_the_checker_fails_on_torch_in_the_core_and_on_a_cycle_inside_one_layer():
    found = new_violations(planted("simfluence.runlog.model", "import torch.nn\n"))
    assert len(found) == 1 and found[0].startswith("simfluence.runlog.model (line ") and \
        found[0].endswith(") imports torch: the core (run logs) imports no torch")
    found = new_violations(planted("simfluence.metrics.trajectory", "from simfluence.evaluation import evaluate\n"))
    assert len(found) == 1 and found[0].startswith("cycle: ") and "simfluence.metrics.trajectory" in found[0] and \
        "simfluence.evaluation" in found[0]


def test_the_checker_exempts_type_checking_imports_from_cycles_but_not_from_layers():
    annotation = ("from typing import TYPE_CHECKING\n"
                  "if TYPE_CHECKING:\n    from simfluence.evaluation import Evaluation\n")
    assert new_violations(planted("simfluence.metrics.trajectory", annotation)) == []
    found = new_violations(planted("simfluence.curriculum", annotation))
    assert len(found) == 1 and "layer 'ids and curricula' is below 'analysis'" in found[0]


def test_the_checker_fails_on_a_module_of_no_layer_and_on_a_private_import_across_packages():
    assert new_violations(planted("simfluence.newcomer", "x = 1\n")) == [
        "module simfluence.newcomer belongs to no layer of LAYERS"]
    trainer = "from simfluence.training import _Trainer\n"
    across = private_imports_across_packages(planted("simfluence.apps.lds", trainer))
    assert len(across) == 1 and across[0].startswith("simfluence.apps.lds (line ") and \
        across[0].endswith(") imports simfluence.training._Trainer")
    inside = planted("simfluence.runlog.logger", "from simfluence.runlog.store import _FILES\n")
    assert private_imports_across_packages(inside) == []


@pytest.mark.parametrize("module", ["simfluence.task", "simfluence.training", "simfluence.workloads.digits"])
def test_the_task_and_the_engine_import_nothing_above_them(module):
    own = layer_of(module)
    above = [arrow for arrow in import_arrows(package_sources())
             if arrow.importer == module and arrow.imported.startswith("simfluence")
             and layer_of(arrow.imported) > own]
    assert above == []
