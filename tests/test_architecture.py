"""The import drawing of src/unillava, checked: layers import only downwards, no import circles, and no
imports hidden inside functions except optional heavy dependencies (each with a comment saying why).

docs/architecture.md draws the same layers; a new module must be given its layer here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("unillava.errors", "unillava.config", "unillava.prompts", "unillava.weights"),
    (
        "unillava.conversation",
        "unillava.data",
        "unillava.llm",
        "unillava.projector",
        "unillava.decoding",
        "unillava.testing",
    ),
    ("unillava.vision",),
    ("unillava.modeling", "unillava.processor"),
    ("unillava.hub",),
    ("unillava.omg",),
    ("unillava.inference", "unillava.generation", "unillava.segmentation"),
    ("unillava.training", "unillava.evaluation", "unillava.serving"),
    ("unillava.demo",),
    ("unillava.cli", "unillava.__main__"),
    ("unillava",),
]

# Imports that may stay inside a function: optional or slow-to-import dependencies a command uses only
# on one path. Each such import carries a comment (on its line or the line above) saying why.
LAZY_ALLOWED = (
    "bitsandbytes",
    "httpx",
    "lmms_eval",
    "openai",
    "playwright",
    "pyarrow",
    "pycocoevalcap",
    "pycocotools",
    "uvicorn",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "unillava").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_architecture.py LAYERS")
    return best


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported unillava module, statement, inside a function) for every import of `module`."""
    tree = ast.parse(path.read_text())
    in_function = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = _target(node, module, path.name == "__init__.py")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            while name not in MODULES and "." in name and name.startswith("unillava"):
                name = name.rsplit(".", 1)[0]
            out.append((name, node, id(node) in in_function))
    return out


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(module, path):
            if name in MODULES and name != module:
                edges[module].add(name)
    return edges


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_run_down_the_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in _graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_no_hidden_imports_inside_functions():
    hidden = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for name, node, in_function in _imports(module, path):
            if not in_function:
                continue
            root = name.split(".")[0]
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if root not in LAZY_ALLOWED or not commented:
                hidden.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not hidden, "\n".join(sorted(set(hidden)))


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above are only worth their silence if they can fail."""
    fake = {"unillava.vision.base": tmp_path / "base.py", "unillava.modeling": tmp_path / "modeling.py"}
    fake["unillava.vision.base"].write_text("from unillava.modeling import LlavaModel\n")
    fake["unillava.modeling"].write_text("def build():\n    from unillava.vision.base import VisionTower\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    with pytest.raises(AssertionError, match="imports unillava.modeling"):
        test_imports_run_down_the_layers()
    with pytest.raises(AssertionError, match="unillava.modeling"):
        test_no_import_circles()
    with pytest.raises(AssertionError, match="from unillava.vision.base import VisionTower"):
        test_no_hidden_imports_inside_functions()
