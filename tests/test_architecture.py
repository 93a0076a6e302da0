"""The package's shape: imports point one way (no cycles, model/ below everything), `import mistral_jax` stays
cheap, and ruff is clean."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mistral_jax", "train")
# What model/ may not import: it is pure math, below every other layer.
ABOVE_MODEL = ("sharding", "checkpoints", "decoding", "tokenizers", "cli", "planner", "distributed", "serving")
HEAVY = ("orbax", "jinja2", "gguf", "tokenizers", "qwix")  # what `import mistral_jax` must not load


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """The module names an AST imports when run (function-local imports included, TYPE_CHECKING blocks not)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports, each import also reaching the packages above its target that the
    importer is not inside (their __init__ runs first)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan's."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The checks below can fail: a two-module loop is found, and so is an edge out of model/."""
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from mistral_jax import sharding\n")
    assert "mistral_jax.sharding" in set(_imports(tree, "mistral_jax.model.x", False))
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mistral_jax.cli\n")
    assert "mistral_jax.cli" not in set(_imports(tree, "mistral_jax.model.x", False))


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def _room(module: str) -> str:
    """The top-level room a module lives in: "train", or mistral_jax's submodule or subpackage ("model", ...)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mistral_jax" and len(parts) > 1 else parts[0]


def test_model_imports_nothing_above_it():
    graph = import_graph()
    upward = [f"{module} -> {target}" for module, targets in sorted(graph.items()) if _room(module) == "model"
              for target in sorted(targets) if _room(target) in ABOVE_MODEL + ("train",)]
    assert upward == []
    assert "mistral_jax.model.transformer" in graph["mistral_jax.sharding"]  # sharding reads the model's axes


def test_mistral_jax_reaches_into_train_only_from_the_cli():
    graph = import_graph()
    into_train = {m for m, targets in graph.items()
                  if m.startswith("mistral_jax") and any(t.startswith("train") for t in targets)}
    assert into_train <= {"mistral_jax.cli"}


def _loaded_by(code: str) -> set[str]:
    """Top-level packages that running `code` in a fresh interpreter imports (python -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return {name.split(".")[0] for name in names}


def test_import_is_lazy():
    """`import mistral_jax` loads none of the heavy readers; `mj.generate` needs none of them either."""
    assert not _loaded_by("import mistral_jax") & set(HEAVY)
    assert not _loaded_by("import mistral_jax as mj; mj.generate; mj.ModelConfig; mj.make_mesh") & set(HEAVY)
    assert {"orbax"} <= _loaded_by("import mistral_jax as mj; mj.load")  # the probe does see a heavy import


def test_every_public_name_resolves():
    import mistral_jax as mj

    for name in mj.__all__:
        assert getattr(mj, name) is not None
    with pytest.raises(AttributeError, match="no_such_thing"):
        mj.no_such_thing  # noqa: B018


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
