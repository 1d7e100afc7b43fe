"""The import structure the layers keep, read statically from the source (ast), so a cycle or a wrong-way import
fails here instead of at import time in whichever order a user happens to import things.

- models/, tokenizer.py and checkpoint_refs.py: no import cycle, and no llmfab import inside a function (the old
  way of dodging one);
- a stage module imports no other stage (what stages share lives in train/, losses/, models/ or registry/);
- train/ (and models/, losses/ below it) never import the stage layer; the Trainer takes any context shaped like
  train.context's protocols, which stages.base.StageContext is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmfab

SRC = Path(llmfab.__file__).parent
STAGE_INFRA = {"llmfab.stages", "llmfab.stages.base", "llmfab.stages.runner"}  # not stages: the registry, the runner


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _in_scope(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(llmfab module imported, line) for each import in `module`; `from pkg import name` counts as pkg.name when
    that is a module. top_level_only: what runs on import (not function bodies nor `if TYPE_CHECKING:`)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if top_level_only and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return [(name, line) for name, line in found if _in_scope(name, "llmfab")]


def _graph() -> dict[str, set[str]]:
    """What importing each module runs first: its module-level llmfab imports and, for a module of another package,
    that package's __init__ (a module's own packages are already importing when it runs)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        edges = graph.setdefault(module, set())
        for target, _ in _imports(module, top_level_only=True):
            edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):
                ancestor = ".".join(parts[:i])
                if not _in_scope(module, ancestor):
                    edges.add(ancestor)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                strongconnect(nxt)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


MODEL_LAYER = ("llmfab.models", "llmfab.tokenizer", "llmfab.checkpoint_refs")


def test_no_import_cycle_through_models_or_the_tokenizer():
    cycles = [c for c in _cycles(_graph()) if any(_in_scope(m, *MODEL_LAYER) for m in c)]
    assert cycles == []


def test_models_and_tokenizer_import_llmfab_at_module_level_only():
    """An import inside a function is how a cycle hides; these modules have none left to hide."""
    late = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if _in_scope(module, *MODEL_LAYER)
        for target, line in sorted(
            set(_imports(module, top_level_only=False)) - set(_imports(module, top_level_only=True))
        )
    ]
    assert late == []


def test_no_stage_imports_another_stage():
    stages = [m for m in MODULES if _in_scope(m, "llmfab.stages") and m not in STAGE_INFRA]
    assert "llmfab.stages.sft" in stages and "llmfab.stages.pretrain" in stages
    wrong = [
        f"{module}:{line} imports {target}"
        for module in stages
        for target, line in _imports(module, top_level_only=False)
        if _in_scope(target, "llmfab.stages") and target not in ("llmfab.stages", "llmfab.stages.base")
    ]
    assert wrong == []


def test_layers_below_the_stages_never_import_them():
    wrong = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if _in_scope(module, "llmfab.train", "llmfab.models", "llmfab.losses")
        for target, line in _imports(module, top_level_only=False)
        if _in_scope(target, "llmfab.stages")
    ]
    assert wrong == []


def test_the_stage_context_is_what_training_code_takes(tmp_path):
    from llmfab.stages.base import StageContext
    from llmfab.storage.local import LocalStore
    from llmfab.train.context import RunContext, TrainingContext

    ctx = StageContext("step", LocalStore(tmp_path))
    assert isinstance(ctx, TrainingContext) and isinstance(ctx, RunContext)
