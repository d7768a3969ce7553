"""The layout the project keeps: modules that import only what they need, by public names,
without changing each other and without import circles (tests are not checked)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("", "benchmarks", "scripts")


def project_modules():
    """{module name: path} of the project's Python files (top level, benchmarks, scripts)."""
    found = {}
    for folder in FOLDERS:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py") and not name.startswith("."):
                found[name[:-3]] = os.path.join(ROOT, folder, name)
    return found


MODULES = project_modules()


def imports_of(tree):
    """(module, names or None, node) for each import of another project module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and not node.level:
            yield node.module, [alias.name for alias in node.names], node


def problems(path):
    """What the architecture forbids in one file: star imports, private names of another
    module (imported or used as module._name), assignments to another module's attributes."""
    tree = ast.parse(open(path).read())
    local = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names if alias.name in MODULES}
    found = []
    for module, names, node in imports_of(tree):
        for name in names or ():
            if name == "*":
                found.append(f"line {node.lineno}: from {module} import *")
            elif name.startswith("_"):
                found.append(f"line {node.lineno}: imports {module}.{name}, a private name")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in local:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"line {node.lineno}: uses {local[node.value.id]}.{node.attr}, a private name")
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append(f"line {node.lineno}: assigns {local[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_public_names_only_and_changes_no_other_module(name):
    assert problems(MODULES[name]) == []


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The checks themselves: a file with each forbidden form is caught on each line."""
    bad = tmp_path / "bad.py"
    bad.write_text("import align\nfrom align import *\nfrom align import _T\nalign.matmul = 1\n"
                   "x = align._shape\n")
    assert sorted(p.split(":")[0] for p in problems(str(bad))) == ["line 2", "line 3", "line 4",
                                                                  "line 5"]


def import_graph():
    """{module: set of project modules it imports} (imports inside functions count too)."""
    return {name: {module for module, _, _ in imports_of(ast.parse(open(path).read()))} - {name}
            for name, path in MODULES.items()}


def test_no_import_circles():
    graph, circles = import_graph(), []

    def visit(name, path):
        for other in sorted(graph[name]):
            if other in path:
                circles.append(path[path.index(other):] + [other])
            else:
                visit(other, path + [other])
    for name in sorted(graph):
        visit(name, [name])
    assert circles == []


def test_the_reference_imports_no_project_module_and_cuda_none_either():
    """align.py is copied alone; align_cuda.py receives what it needs as arguments."""
    graph = import_graph()
    assert graph["align"] == set() and graph["align_cuda"] == set()
    assert graph["align_fast"] <= {"align", "align_cuda"}
    assert graph["structured"] == {"align"}
    assert "experiments" not in graph["runner"]
