"""Imports flow one way, tier by tier, from the errors up to the public API; nothing in the library imports the CLI.

A module may import its own group and groups of a lower tier. Groups that share a tier are siblings and never
import each other (``io`` and ``merge`` are the classic pair): a new edge between siblings, or any upward edge,
fails here until someone decides the order on purpose and writes it down below. A group is a package prefix, so a
new module inside ``mmer/merge/`` or ``mmer/add/`` belongs to its package without being listed; a new top-level
module or package must be given a tier.

Today's layer 5 (the commands built on a merge) has a real order, read off its imports: ``inspect``, ``demo``,
``extend``, ``verify`` and ``add`` use nothing from each other (5a); ``route`` uses ``extend`` and ``compare`` uses
``inspect`` (5b). ``tune`` sits above them all (6). Below them, a merge is planned (``plan``, 4a), run by the
streaming engine (``engine``, 4b) and wired into an artifact (``pipeline``, 4c).

Relative imports (``from . import x``, ``from ..y import z``) are resolved to absolute names and checked the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "mmer"

TIERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("0", ("mmer.errors", "mmer.version", "mmer.synthetic")),
    ("0b", ("mmer.mergekit_config",)),  # a mergekit config as an mmer recipe mapping; read by mmer.config
    ("1", ("mmer.config", "mmer.progress", "mmer.runtime")),
    ("2", ("mmer.io", "mmer.merge")),
    ("3", ("mmer.checkpoint",)),
    ("4a", ("mmer.plan",)),
    ("4b", ("mmer.engine",)),
    ("4c", ("mmer.pipeline",)),
    ("5a", ("mmer.inspect", "mmer.demo", "mmer.extend", "mmer.verify", "mmer.add")),
    ("5b", ("mmer.route", "mmer.compare")),
    ("6", ("mmer.tune",)),
    ("7", ("mmer",)),
)
RANK = {group: (rank, name) for rank, (name, groups) in enumerate(TIERS) for group in groups}
FORBIDDEN_IN_LIBRARY = ("typer", "rich", "click", "mmer_cli")


def group_of(module: str) -> str:
    """The longest listed package prefix of ``module``; the bare ``mmer`` package only for itself."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[:n])
        if key in RANK:
            return key
    if module == "mmer":
        return "mmer"
    raise AssertionError(f"{module} is in no group: give mmer.{parts[1]} a tier in TIERS (tests/test_layering.py)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of the repository (so ``from pkg import name`` imports a module)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def resolve_from(node: ast.ImportFrom, path: Path) -> list[str]:
    """Absolute names a ``from … import …`` reaches: the submodule when a name is one, else the module itself."""
    if node.level == 0:
        base = node.module or ""
    else:
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package.pop()
        if node.level > 1:
            package = package[: len(package) - (node.level - 1)]
        assert package, f"{path}: relative import climbs out of the repository"
        base = ".".join(package + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        out.append(candidate if alias.name != "*" and is_module(candidate) else base)
    return out


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += resolve_from(node, path)
    return out


MODULES = sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_library_modules_import_only_their_own_group_or_a_lower_tier(path):
    me = module_name(path)
    my_group = group_of(me)
    my_rank, my_tier = RANK.get(my_group, (len(TIERS) - 1, "7"))
    for imported in imports(path):
        top = imported.split(".")[0]
        assert top not in FORBIDDEN_IN_LIBRARY, f"{me} imports {imported}: the library never imports CLI tools"
        if top != "mmer":
            continue
        group = group_of(imported)
        if group == my_group:
            continue
        rank, tier = RANK[group]
        assert rank <= my_rank, f"{me} (tier {my_tier}) imports {imported} (tier {tier}): an upward import"
        assert rank < my_rank, (
            f"{me} imports {imported}: {my_group} and {group} are siblings in tier {tier}; "
            "if one must use the other, give it a tier of its own above (tests/test_layering.py)"
        )


def test_relative_imports_resolve_to_absolute_modules(tmp_path, monkeypatch):
    """``from . import x`` and ``from ..y import z`` are checked like the absolute imports they stand for."""
    package = tmp_path / "mmer" / "merge"
    package.mkdir(parents=True)
    (tmp_path / "mmer" / "__init__.py").write_text("")
    (tmp_path / "mmer" / "errors.py").write_text("")
    (package / "__init__.py").write_text("from . import slot\n")
    (package / "slot.py").write_text("")
    source = package / "engine.py"
    source.write_text("from . import slot\nfrom .slot import x\nfrom ..errors import Oops\nfrom .. import errors\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert imports(source) == ["mmer.merge.slot", "mmer.merge.slot", "mmer.errors", "mmer.errors"]
    assert imports(package / "__init__.py") == ["mmer.merge.slot"]


def test_an_upward_or_sibling_import_is_caught():
    assert RANK[group_of("mmer.tune.search")] > RANK[group_of("mmer.add.sources")]
    assert RANK[group_of("mmer.merge.engine")] == RANK[group_of("mmer.io.hashing")]
    assert RANK[group_of("mmer.route.reconstruct")] > RANK[group_of("mmer.extend.pack")]
    with pytest.raises(AssertionError, match="give mmer.unlisted a tier"):
        group_of("mmer.unlisted.module")


def test_tune_does_not_import_add():
    """What re-merging from a checkpoint needs (its recorded sources, the stand-in reader) lives beside the
    checkpoint code, so ``tune`` and ``add`` share it without one depending on the other."""
    tune = [LIBRARY / "tune.py", *(LIBRARY / "tune").rglob("*.py")]
    for path in (p for p in tune if p.is_file()):
        used = [name for name in imports(path) if name == "mmer.add" or name.startswith("mmer.add.")]
        assert not used, f"{module_name(path)} imports {used[0]}"


def test_merge_math_depends_on_torch_numpy_and_errors_only():
    """No I/O, config or checkpoint code in the math (numpy counts bits, numba compiles ``merge.one_pass``)."""
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
    for path in (LIBRARY / "merge").rglob("*.py"):
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
