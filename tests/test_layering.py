"""Imports flow one way: errors/config → io, merge → checkpoint → plan/pipeline → inspect/demo → the public API → cli.

A module may import only from its own layer or below; ``io`` and ``merge`` are siblings that never import
each other; nothing in the library imports the CLI's tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "mmer"

LAYERS = {
    "mmer.errors": 0,
    "mmer.version": 0,
    "mmer.config": 1,
    "mmer.progress": 1,
    "mmer.runtime": 1,
    "mmer.io": 2,
    "mmer.merge": 2,
    "mmer.checkpoint": 3,
    "mmer.plan": 4,
    "mmer.pipeline": 4,
    "mmer.inspect": 5,
    "mmer.demo": 5,
    "mmer.route": 5,
    "mmer.extend": 5,
    "mmer.verify": 5,
    "mmer.compare": 5,
    "mmer.add": 5,
    "mmer.tune": 6,
    "mmer": 7,
}
FORBIDDEN_IN_LIBRARY = ("typer", "rich", "click", "mmer_cli")


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


MODULES = sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_library_modules_import_only_their_own_layer_or_below(path):
    me = module_name(path)
    my_group, my_layer = layer_of(me)
    for imported in imports(path):
        top = imported.split(".")[0]
        assert top not in FORBIDDEN_IN_LIBRARY, f"{me} imports {imported}: the library never imports CLI tools"
        if top != "mmer":
            continue
        group, layer = layer_of(imported)
        assert layer <= my_layer, f"{me} (layer {my_layer}) imports {imported} (layer {layer}): an upward import"
        if my_group in ("mmer.io", "mmer.merge") and group in ("mmer.io", "mmer.merge"):
            assert group == my_group, f"{me} imports {imported}: io and merge are siblings"


def test_merge_math_depends_on_torch_numpy_and_errors_only():
    """No I/O, config or checkpoint code in the math (numpy counts bits, numba compiles ``merge.fused``)."""
    allowed = {
        "torch",
        "numpy",
        "numba",
        "os",
        "functools",
        "mmer",
        "__future__",
        "collections",
        "dataclasses",
        "typing",
        "math",
        "hashlib",
    }
    for path in (LIBRARY / "merge").glob("*.py"):
        for imported in imports(path):
            top = imported.split(".")[0]
            assert top in allowed, f"{path.name} imports {imported}"
            if top == "mmer":
                assert imported.startswith(("mmer.merge", "mmer.errors")), f"{path.name} imports {imported}"


def test_only_the_reader_calls_torch_load():
    for path in list(LIBRARY.rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        if path == LIBRARY / "io" / "reader.py":
            continue
        assert "torch.load(" not in path.read_text(encoding="utf-8"), f"{path} calls torch.load"
