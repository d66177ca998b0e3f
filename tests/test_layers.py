"""The layering is a checked contract (docs/architecture.md): import-linter's contracts hold
(layers and no cycles from ``pyproject.toml``; the algorithm modules independent of each
other, that contract built from the modules the catalog finds, so that a new module is
checked as it is), the catalog finds exactly the modules that register trainers, the
"Reading one algorithm" table lists each algorithm's imports of the algorithm layer (five
files at most), and a function-local import of an aligner module outside the command line
says why in a comment."""
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def independence_contract(modules) -> str:
    """The ``algorithms`` contract of import-linter over ``modules``, as TOML."""
    return ('\n[[tool.importlinter.contracts]]\nid = "algorithms"\n'
            'name = "algorithm modules are independent of each other"\ntype = "independence"\n'
            f"modules = {json.dumps(list(modules))}\n")


def test_import_contracts_hold(capsys, tmp_path):
    from importlinter import configuration
    from importlinter.application.use_cases import lint_imports

    from aligner.algorithms.catalog import algorithm_modules

    modules = algorithm_modules()
    assert len(modules) >= 8, modules
    config = tmp_path / "importlinter.toml"  # pyproject's contracts and the one built here
    config.write_text((ROOT / "pyproject.toml").read_text() + independence_contract(modules))
    configuration.configure()
    kept = lint_imports(config_filename=str(config), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, report
    assert "3 kept, 0 broken" in report
    assert "algorithm modules are independent of each other KEPT" in report


def test_the_catalog_finds_exactly_the_modules_that_register_trainers():
    from aligner.algorithms.catalog import SHARED_CORE, TRAINERS, algorithm_modules

    registering = {".".join(cls.__module__.split(".")[:3]) for cls in TRAINERS.values()}
    assert registering == set(algorithm_modules())
    assert {m.rsplit(".", 1)[1] for m in algorithm_modules()}.isdisjoint(SHARED_CORE)


def _algorithm_layer_imports(path: Path):
    """The ``aligner.algorithms`` modules ``path`` imports, at the top or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {n for n in names if n.startswith("aligner.algorithms.")}
    return found


def test_reading_one_algorithm_takes_the_files_the_architecture_page_lists():
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page.split("### Reading one algorithm", 1)[1].split("\n| ", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 7, table
    for name, own, core, count in rows:
        module = re.search(r"`(algorithms/\w+\.py)`", own).group(1)
        listed = set(re.findall(r"`(algorithms/[\w/]+\.py)`", core))
        imported = {"/".join(m.split(".")[1:]) + ".py" for m in _algorithm_layer_imports(ROOT / "aligner" / module)}
        assert listed == imported, name
        assert int(count.strip(" |")) == 1 + len(imported) <= 5, name


def _function_local_imports(path: Path):
    """``(line, has_comment)`` of each import of an aligner module inside a function body;
    the comment stands on the line, or on the line above with the imports of its group."""
    lines = path.read_text().splitlines()
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if any(n.startswith("aligner") for n in names):
                    out.append(child.lineno)
            visit(child, inner)

    visit(ast.parse("\n".join(lines)), False)
    result = []
    for lineno in out:
        row = lineno - 1
        while row > 0 and lines[row - 1].strip().startswith(("from aligner", "import aligner")):
            row -= 1  # a group of imports under one comment
        commented = "#" in lines[lineno - 1] or lines[row - 1].strip().startswith("#")
        result.append((lineno, commented))
    return result


def test_function_local_imports_outside_the_command_line_say_why():
    package = ROOT / "aligner"
    silent = [f"{path.relative_to(ROOT)}:{lineno}" for path in sorted(package.rglob("*.py"))
              if path.relative_to(package).parts[0] != "cli"
              for lineno, commented in _function_local_imports(path) if not commented]
    assert not silent, f"function-local aligner imports without a comment saying why: {silent}"
