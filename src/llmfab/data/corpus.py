"""Pre-training text that needs no download: English prose and Python code from the stdlib.

Prose comes from `pydoc_data.topics` (the language reference's help topics) and from docstrings
parsed (not imported) out of the standard library's sources; code is those source files. The
file list is sorted and sampling is seeded, so the corpus is the same on every machine with the
same Python version.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in skip or part.startswith("test") for part in rel):
            continue
        files.append(path)
    return files


def _split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut long text into documents of at most ~max_chars at paragraph boundaries."""
    docs, current = [], ""
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para[:max_chars]
    if current:
        docs.append(current)
    return docs


def prose_documents(max_docs: int, seed: int = 0, max_chars: int = 2000) -> list[str]:
    """English prose: help topics and module/class/function docstrings."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        docs.extend(_split_paragraphs(topics[key], max_chars))
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.extend(_split_paragraphs(doc, max_chars))
    docs = [d for d in dict.fromkeys(docs) if len(d) >= 80]
    random.Random(seed).shuffle(docs)
    return docs[:max_docs]


def code_documents(max_docs: int, seed: int = 0, max_chars: int = 2000) -> list[str]:
    """Python source: stdlib files cut into chunks at blank lines between top-level blocks."""
    docs = []
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(_split_paragraphs(text.replace("\n\n\n", "\n\n"), max_chars))
    docs = [d for d in dict.fromkeys(docs) if len(d) >= 120]
    random.Random(seed).shuffle(docs)
    return docs[:max_docs]
