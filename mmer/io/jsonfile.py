"""The one way mmer parses JSON it did not write itself: bounded in size and depth, strict about numbers.

Every JSON document mmer reads may be hostile (configs, indexes, manifests, safetensors headers, mask and pack
metadata). Python's parser recurses, so a deeply nested document ends in ``RecursionError``; it turns a
5,000-digit integer into ``ValueError`` and ``1e999`` into ``inf``; and it reads a file of any size into memory.
Here each of those becomes one :class:`~mmer.errors.MmerError` subclass naming the file, and a parsed document
is guaranteed to be no deeper than ``max_depth`` so that later code may walk it recursively.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmer.errors import CheckpointFormatError, MmerError

MAX_JSON_BYTES = 100 * 1024 * 1024  # as large as a safetensors header may be; configs are far smaller
MAX_JSON_DEPTH = 64  # real configs, indexes and manifests nest fewer than 10 levels

DEFAULT_HINT = "the file is corrupt or hostile; fetch or re-create it"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def _depth_within(data: Any, max_depth: int) -> bool:
    """Iterative (never recursive) depth check of a parsed document."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def loads_bounded(
    raw: bytes | str,
    file: str | Path,
    *,
    what: str = "file",
    error: type[MmerError] = CheckpointFormatError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    object_pairs_hook: Any = None,
    hint: str | None = DEFAULT_HINT,
) -> Any:
    """Parse ``raw`` as JSON, or raise ``error`` naming ``file`` and what was wrong."""
    file = str(file)
    if len(raw) > max_bytes:
        raise error(f"{file}: {what} is {len(raw)} bytes, over the {max_bytes}-byte limit", file=file, hint=hint)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=object_pairs_hook,
        )
    except UnicodeDecodeError as err:
        why = f"{err.reason} at byte {err.start}"
        raise error(f"{file}: {what} is not UTF-8 text ({why})", file=file, hint=hint) from None
    except RecursionError:
        raise error(f"{file}: {what} nests too deeply to be a real {what}", file=file, hint=hint) from None
    except json.JSONDecodeError as err:
        raise error(f"{file}: {what} is not valid JSON ({err})", file=file, hint=hint) from None
    except ValueError as err:  # huge integers, NaN/Infinity, numbers that overflow a float
        raise error(f"{file}: {what} holds an invalid number ({str(err)[:120]})", file=file, hint=hint) from None
    if not _depth_within(data, max_depth):
        raise error(f"{file}: {what} nests more than {max_depth} levels deep", file=file, hint=hint)
    return data


def _read_at_most(f: Any, limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes, in chunks: ``f.read(limit)`` would allocate all ``limit`` bytes for a small file."""
    parts: list[bytes] = []
    total = 0
    while total < limit:
        part = f.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def read_json_file(
    path: str | Path,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    error: type[MmerError] = CheckpointFormatError,
    hint: str | None = DEFAULT_HINT,
    **parse: Any,
) -> Any:
    """Read and parse a JSON file, refusing one over ``max_bytes`` before reading it into memory.

    ``parse`` takes :func:`loads_bounded`'s other keywords (``what``, ``max_depth``, ``object_pairs_hook``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = _read_at_most(f, max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path}: missing", file=str(path), hint=hint) from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})", file=str(path), hint=hint) from None
    return loads_bounded(raw, path, max_bytes=max_bytes, error=error, hint=hint, **parse)
