"""Seeded mutations of the files mmer reads: blind byte edits, and JSON-aware edits that re-type fields.

Blind edits (truncate, flip, insert, delete) do what a cut-short download or bit rot does; JSON-aware edits get
past the parser to the checks behind it, which random bytes almost never reach. Every case draws from a
``random.Random`` seeded by a string, so a failure is replayed from the seed the harness prints, on any machine.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Path_ = tuple[Any, ...]  # keys and list indexes from the root of a document to one of its nodes


@dataclass(frozen=True)
class Raw:
    """Bytes written verbatim where a JSON value goes: what ``json.dumps`` cannot or will not produce."""

    data: bytes
    label: str

    def __repr__(self) -> str:
        return self.label


@dataclass
class Pairs:
    """A JSON object that may name a key twice (Python dicts cannot)."""

    items: list[tuple[str, Any]]


@dataclass
class Embedded:
    """A string field whose text is itself JSON (mask metadata ``shapes``): mutated as a tree, stored as text."""

    tree: Any


def nested(depth: int) -> Raw:
    return Raw(b"[" * depth + b"]" * depth, f"<{depth} nested [>")


def dumps(value: Any) -> bytes:
    """JSON text of ``value``, with :class:`Raw`, :class:`Pairs`, :class:`Embedded`, NaN and lone surrogates."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Embedded):
        return dumps(dumps(value.tree).decode("utf-8", "surrogateescape"))
    if isinstance(value, Pairs):
        return b"{" + b",".join(dumps(str(k)) + b":" + dumps(v) for k, v in value.items) + b"}"
    if isinstance(value, dict):
        return dumps(Pairs(list(value.items())))
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dumps(v) for v in value) + b"]"
    if isinstance(value, float) and not math.isfinite(value):
        return b"NaN" if math.isnan(value) else (b"Infinity" if value > 0 else b"-Infinity")
    if isinstance(value, str):
        # ensure_ascii=False keeps unicode as UTF-8; a lone surrogate becomes bytes that are not UTF-8 at all
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


def embed_json_strings(tree: Any) -> Any:
    """Turn every string that holds a JSON object or list into an :class:`Embedded` node, recursively."""
    if isinstance(tree, dict):
        return {k: embed_json_strings(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [embed_json_strings(v) for v in tree]
    if isinstance(tree, str) and tree[:1] in ("{", "["):
        try:
            inner = json.loads(tree)
        except ValueError:
            return tree
        if isinstance(inner, dict | list):
            return Embedded(embed_json_strings(inner))
    return tree


def hostile_paths(target_dir: str | os.PathLike, sentinel: str | os.PathLike) -> list[str]:
    """Paths that leave ``target_dir`` for the sentinel (so that following one is seen), and other tricks."""
    rel = os.path.relpath(os.path.join(sentinel, "model.safetensors"), target_dir)
    return [
        rel,
        os.path.relpath(os.path.join(sentinel, "secret.txt"), target_dir),
        os.path.join(os.fspath(sentinel), "model.safetensors"),
        os.path.join(os.fspath(sentinel), "secret.txt"),
        "../x",
        "a/../../x",
        "./" + os.path.basename(rel),
        "C:\\x",
        "sub//x",
        ".",
        "/",
    ]


def hostile_values(paths: list[str]) -> list[Any]:
    """Values a field should never hold, each a type, range or encoding a hand-written check may miss."""
    return [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**31,
        2**63,
        -(2**63),
        10**400,
        0.5,
        -0.0,
        1e308,
        float("nan"),
        float("inf"),
        float("-inf"),
        Raw(b"1" + b"0" * 5000, "<5001-digit integer>"),
        Raw(b"1e999", "1e999"),
        Raw(b"-Infinity", "-Infinity"),
        "",
        "x",
        "A" * 10_000,
        "é",
        "\u202e",
        "a\x00b",
        "\ud800",
        Raw(b'"\\ud800"', '"\\ud800"'),
        Raw(b'"\xff\xfe"', '"<not UTF-8>"'),
        [],
        {},
        [1, 2],
        {"a": 1},
        [-1, 2],
        [10**400],
        nested(500),
        Raw(b'{"a":' * 500 + b"1" + b"}" * 500, "<500 nested {>"),
        nested(100_000),
        *paths,
    ]


def retypes(value: Any) -> list[Any]:
    """The same value in another type, or nearly the same value: what a loose reader would silently accept."""
    out: list[Any] = [[value], {"value": value}]
    if isinstance(value, bool):
        out += [not value, int(value), str(value).lower()]
    elif isinstance(value, int):
        out += [str(value), float(value), value + 1, value - 1, -value, value * 2**40, bool(value), [value]]
    elif isinstance(value, float):
        out += [str(value), int(value) if math.isfinite(value) else 0, -value, value * 1e300, value * 2]
    elif isinstance(value, str):
        out += [value.upper(), value + "/../x", value[:-1], "../" + value, value + "\x00", value.encode().hex()]
        if value.strip().lstrip("-").isdigit():
            out.append(int(value))
    elif isinstance(value, list):
        out += [dict(enumerate(value)), value[:-1], value + value[-1:], list(reversed(value)), value * 2]
    elif isinstance(value, dict):
        out += [list(value.values()), list(value.keys()), dict.fromkeys(value)]
    return out


def nodes(tree: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Every node below the root (the root itself excluded), depth first."""
    inner = tree.tree if isinstance(tree, Embedded) else tree
    if isinstance(inner, dict):
        children = list(inner.items())
    elif isinstance(inner, list):
        children = list(enumerate(inner))
    else:
        return
    for key, child in children:
        yield (*path, key)
        yield from nodes(child, (*path, key))


def schema_path(path: Path_) -> str:
    """``slots.*.shape`` for ``("slots", 7, "shape")``: nodes of one field are one group, however many there are."""
    return ".".join("*" if isinstance(p, int) else str(p) for p in path) or "<root>"


def _container(tree: Any, path: Path_) -> Any:
    node = tree
    for key in path:
        node = node.tree if isinstance(node, Embedded) else node
        node = node[key]
    return node.tree if isinstance(node, Embedded) else node


def get(tree: Any, path: Path_) -> Any:
    return _container(tree, path[:-1])[path[-1]]


def put(tree: Any, path: Path_, value: Any) -> None:
    _container(tree, path[:-1])[path[-1]] = value


@dataclass
class Mutation:
    """One case's input: the bytes to write, and how they were made (printed on failure)."""

    data: bytes
    ops: list[str] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)  # what the mutation did, for oracles ("stale-sidecar", ...)


# ------------------------------------------------------------------------------------------------ blind bytes

TOKENS = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"\x00", b"\xff", b"\\", b"\n", b"NaN", b"-", b"9" * 30, b"\xc3")


def _position(rng: random.Random, size: int, hot: tuple[int, int] | None) -> int:
    if hot is not None and min(hot[1], size) > hot[0] and rng.random() < 0.8:
        return rng.randrange(hot[0], min(hot[1], size))
    return rng.randrange(max(size, 1))


def mutate_bytes(rng: random.Random, data: bytes, hot: tuple[int, int] | None = None) -> Mutation:
    """1–3 blind edits; ``hot`` is the byte range (a header) where most of them land."""
    buf = bytearray(data)
    ops: list[str] = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.choice(("truncate", "flip", "flip", "set", "insert", "delete"))
        if not buf:
            op = "insert"
        at = _position(rng, len(buf), hot)
        if op == "truncate":
            del buf[at:]
            ops.append(f"truncate at {at}")
        elif op == "flip":
            bit = rng.randrange(8)
            buf[at] ^= 1 << bit
            ops.append(f"flip bit {bit} of byte {at}")
        elif op == "set":
            value = rng.randrange(256)
            buf[at] = value
            ops.append(f"set byte {at} to {value:#04x}")
        elif op == "insert":
            chunk = rng.choice(TOKENS) if rng.random() < 0.6 else rng.randbytes(rng.randint(1, 8))
            buf[at:at] = chunk
            ops.append(f"insert {bytes(chunk)!r} at {at}")
        else:
            n = rng.randint(1, 16)
            del buf[at : at + n]
            ops.append(f"delete {n} bytes at {at}")
    return Mutation(bytes(buf), ops)


# ------------------------------------------------------------------------------------------------- JSON-aware

HOSTILE_KEYS = ("", "A", "base", "é", "\x00", "\ud800", "../x", "__proto__", "x" * 300, "vision ")


def mutate_tree(
    rng: random.Random,
    tree: Any,
    paths: list[str],
    focus: Callable[[Path_], bool] | None = None,
    focus_share: float = 0.7,
) -> list[str]:
    """1–3 edits of ``tree`` in place: re-type, tweak, drop, add, rename or duplicate a field.

    Fields are drawn by group (``slots.*.shape`` is one group, whatever the number of slots) so that a rare
    field is hit as often as one repeated a thousand times; ``focus`` narrows most draws to the fields a family
    is about (mask metadata inside a whole safetensors header).
    """
    values = hostile_values(paths)
    ops: list[str] = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        groups: dict[str, list[Path_]] = {}
        for p in nodes(tree):
            groups.setdefault(schema_path(p), []).append(p)
        if focus is not None and rng.random() < focus_share:
            focused = {g: ps for g, ps in groups.items() if focus(ps[0])}
            groups = focused or groups
        if not groups:
            break
        path = rng.choice(groups[rng.choice(sorted(groups))])
        parent = _container(tree, path[:-1])
        key = path[-1]
        where = schema_path(path) if not isinstance(key, int) else f"{schema_path(path[:-1])}[{key}]"
        op = rng.choice(("retype", "retype", "tweak", "drop", "add", "rename", "duplicate"))
        if isinstance(parent, list) and op in ("rename", "duplicate"):
            op = "retype"
        if op == "retype":
            value = rng.choice(values)
            put(tree, path, value)
            ops.append(f"set {where} = {_short(value)}")
        elif op == "tweak":
            old = get(tree, path)
            old = old.tree if isinstance(old, Embedded) else old
            value = rng.choice(retypes(old))
            put(tree, path, value)
            ops.append(f"tweak {where}: {_short(old)} -> {_short(value)}")
        elif op == "drop":
            del parent[key]
            ops.append(f"drop {where}")
        elif op == "add":
            value = rng.choice(values) if rng.random() < 0.7 else get(tree, path)
            if isinstance(parent, list):
                parent.insert(rng.randrange(len(parent) + 1), value)
                ops.append(f"add to {schema_path(path[:-1])}: {_short(value)}")
            else:
                new_key = rng.choice(HOSTILE_KEYS + ("extra", f"{key}_2"))
                parent[new_key] = value
                ops.append(f"add key {new_key!r} beside {where}: {_short(value)}")
        elif op == "rename":
            new_key = rng.choice(HOSTILE_KEYS + (str(key).upper(), *paths[:2]))
            items = [(new_key if k == key else k, v) for k, v in parent.items()]
            parent.clear()
            parent.update(items)
            ops.append(f"rename key {where} -> {new_key!r}")
        else:
            other = rng.choice(values) if rng.random() < 0.5 else get(tree, path)
            items = list(parent.items())
            i = [k for k, _ in items].index(key)
            items.insert(i + 1 if rng.random() < 0.5 else i, (key, other))
            _replace_with_pairs(tree, path[:-1], items)
            ops.append(f"duplicate key {where} (second value {_short(other)})")
            break  # a Pairs object is no longer a dict: stop editing this tree
    return ops


def _replace_with_pairs(tree: Any, path: Path_, items: list[tuple[str, Any]]) -> None:
    if not path:
        raise _RootPairs(items)
    put(tree, path, Pairs(items))


class _RootPairs(Exception):
    """The root object itself got a duplicate key: the caller serialises these pairs instead of the tree."""

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        super().__init__("root pairs")
        self.items = items


def mutate_json(
    rng: random.Random,
    text: bytes,
    paths: list[str],
    focus: Callable[[Path_], bool] | None = None,
    embedded: bool = False,
) -> Mutation:
    """Parse ``text`` (valid JSON), edit its tree and serialise it again; or, now and then, replace it outright."""
    roll = rng.random()
    if roll < 0.04:
        value = rng.choice([nested(500), nested(100_000), Raw(b"[]", "[]"), Raw(b"null", "null"), Raw(b'"x"', '"x"')])
        return Mutation(dumps(value), [f"replace the whole document with {_short(value)}"])
    tree = json.loads(text)
    if embedded:
        tree = embed_json_strings(tree)
    try:
        ops = mutate_tree(rng, tree, paths, focus)
        data = dumps(tree)
    except _RootPairs as root:
        ops = [f"duplicate a top-level key (of {len(root.items)})"]
        data = dumps(Pairs(root.items))
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data
        ops.append("prefix a UTF-8 byte order mark")
    return Mutation(data, ops)


def _short(value: Any) -> str:
    if isinstance(value, Embedded):
        value = value.tree
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...<{len(text)} chars>"
