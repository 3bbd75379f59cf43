"""The layers of docs/architecture.md hold: import contracts, no cycles, a small public API."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "sdtune"


def test_the_import_contracts_of_pyproject_hold():
    """lint-imports: the layers, the demo on the public API, a config that knows no registry, no
    library module importing the test fixtures, no cycles among siblings (TYPE_CHECKING imports count)."""
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_two_modules_import_each_other_even_through_others():
    planted = grimp.ImportGraph()  # the check finds a cycle through a third module
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        planted.add_import(importer=importer, imported=imported)
    assert [sorted(cycle) for cycle in _cycles(planted)] == [["p.a", "p.b", "p.c"]]
    graph = grimp.build_graph("sdtune", exclude_type_checking_imports=False)
    assert not _cycles(graph)
    # the figures are drawn from the numbers, and the report uses the figures, never the reverse
    assert graph.find_shortest_chain(importer="sdtune.report.plots", imported="sdtune.report.render") is None


def test_the_core_never_imports_the_demo_and_importing_sdtune_is_light():
    code = (
        "import sys\n"
        "import sdtune\n"
        "assert 'torch' not in sys.modules, 'import sdtune loads the library'\n"
        "import sdtune.comparison, sdtune.metrics, sdtune.cli, sdtune.runner, sdtune.export\n"
        "assert not [m for m in sys.modules if m.startswith('sdtune.demo')], 'the core imports the demo'\n"
        "from sdtune.config import ConfigError\n"
        "from sdtune.config.schema import ConfigError as Leaf\n"
        "assert ConfigError is Leaf\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["load_experiment", "train", "compare", "generate", "render_report", "export_merged",
                                  "export_single_file", "compare_plan", "train_technique", "summary_table",
                                  "estimate_memory", "weight_anatomy", "tune", "tune_plan", "check_tuning"])
def test_the_public_api_is_one_import_away_and_documented(name):
    import sdtune

    function = getattr(sdtune, name)
    assert callable(function) and function.__module__.startswith("sdtune.") and len(function.__doc__ or "") > 40
    assert name in sdtune.__all__ and name in dir(sdtune)


def test_no_module_is_over_650_lines_and_no_private_name_crosses_a_module():
    long = {str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 650}
    assert not long
    crossing = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdtune"):
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing
