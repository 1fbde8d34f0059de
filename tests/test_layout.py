"""The package's shape, read from its source: imports point one way, never in a cycle, no private
name crosses a module, every module says what lives in it.

Layers (docs/design.md, "Layers"), lowest first::

    base      errors, config                        (what everything may read)
    library   models/ align/ data/ convert/ sharding tokenizer metrics rundir checkpoint
              train_step recipes storage logs tracking progress manifest goodput
    builder   builder                               (config -> model, the one road)
    tools     train aot export probe labels generate demo eval
    entry     <tool>.__main__, cli                  (command lines)

A module may import its own layer (without a cycle) or any layer below it. Function-level
(deferred) imports count: a deferred import is still a dependency.
"""
import ast
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "sea_jax"

BASE = {"sea_jax.errors", "sea_jax.config"}
LIBRARY_PACKAGES = ("sea_jax.models", "sea_jax.align", "sea_jax.data", "sea_jax.convert")
LIBRARY = {"sea_jax.sharding", "sea_jax.tokenizer", "sea_jax.metrics", "sea_jax.rundir", "sea_jax.checkpoint",
           "sea_jax.train_step", "sea_jax.recipes", "sea_jax", "sea_jax.storage", "sea_jax.logs", "sea_jax.tracking",
           "sea_jax.progress", "sea_jax.manifest", "sea_jax.goodput"}
TOOLS = ("sea_jax.train", "sea_jax.aot", "sea_jax.export", "sea_jax.probe", "sea_jax.labels", "sea_jax.generate",
         "sea_jax.demo", "sea_jax.eval", "sea_jax.records")
RANK = {"base": 0, "library": 1, "builder": 2, "tools": 3, "entry": 4}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod.endswith(".__main__") or mod == "sea_jax.cli":
        return "entry"
    if mod == "sea_jax.builder":
        return "builder"
    if mod in LIBRARY or mod.startswith(tuple(p + "." for p in LIBRARY_PACKAGES)) or mod in LIBRARY_PACKAGES:
        return "library"
    if any(mod == t or mod.startswith(t + ".") for t in TOOLS):
        return "tools"
    raise AssertionError(f"{mod} belongs to no layer: add it to tests/test_layout.py and docs/design.md")


def _resolve(name: str) -> str | None:
    """The sea_jax module a dotted name refers to (a module, or the module defining an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str) -> dict[str, set[str]]:
    """{imported sea_jax module: set of names taken from it}, every import statement counted."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    package = mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sea_jax"):
                    target = _resolve(a.name)
                    out.setdefault(target, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            if not base.startswith("sea_jax"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.setdefault(sub, set())
                else:
                    out.setdefault(_resolve(base), set()).add(a.name)
    out.pop(mod, None)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer_and_a_docstring():
    for mod, path in MODULES.items():
        layer(mod)
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{path.relative_to(ROOT)} has no docstring saying what lives there"


def test_imports_point_down_the_layers():
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            if RANK[layer(dep)] > RANK[layer(mod)]:
                bad.append(f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)})")
            if layer(mod) == "tools" and dep.endswith(".__main__"):
                bad.append(f"{mod} imports the entry point {dep}")
    assert not bad, "\n".join(bad)


def test_the_trainer_does_not_know_the_demo():
    for mod, deps in GRAPH.items():
        if mod == "sea_jax.train" or mod.startswith("sea_jax.train."):
            assert not [d for d in deps if d.startswith("sea_jax.demo")], mod


def _cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle({m: set(d) for m, d in GRAPH.items()})
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_crosses_a_module():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sea_jax"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{mod}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("sea_jax") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not bad, "\n".join(bad)


def test_no_stale_references():
    """Comments point to docs/design.md in the repository, not to files outside it; config files
    import the schema instead of patching sys.path."""
    for path in list(PKG.rglob("*.py")) + list((ROOT / "configs").glob("*.py")):
        text = path.read_text()
        refs = re.findall(r"[\w./-]*design\.md", text, flags=re.IGNORECASE)
        assert all(r.endswith("docs/design.md") for r in refs), (path, refs)
        assert "sys.path" not in text, path
        assert "_get(config" not in text and "not in base_config" not in text, path


@pytest.mark.parametrize("tool", [t.split(".")[1] for t in TOOLS if t != "sea_jax.demo"])
def test_every_tool_has_an_entry_point(tool):
    if f"sea_jax.{tool}" not in MODULES:
        pytest.skip(f"sea_jax.{tool} not built yet")
    assert f"sea_jax.{tool}.__main__" in MODULES


def test_layer_table_matches_the_design_doc():
    doc = (ROOT / "docs" / "design.md").read_text()
    for tool in TOOLS:
        if tool in MODULES:
            assert f"`{tool.split('.')[1]}" in doc, tool
    assert os.path.exists(ROOT / "docs" / "design.md")
