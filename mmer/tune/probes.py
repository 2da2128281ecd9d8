"""Probe inputs for the ``logits`` score: token ids or texts, read from a file the caller gives (never trusted:
bounded, UTF-8, each probe checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmer.errors import ConfigError
from mmer.io.jsonfile import MAX_JSON_BYTES, loads_bounded
from mmer.tune.errors import refused


def load_probes(path: str | Path, tokenizer_dir: str | Path | None = None) -> list[list[int]]:
    """Probe inputs: ``.jsonl`` (one per line: a list of token ids, ``{"input_ids": [...]}``, ``{"text": ...}`` or
    a string), ``.json`` (a list of those), or ``.txt`` (one text per line). Text is tokenized with the model's
    own tokenizer (``tokenizer_dir``, local files only, no remote code)."""
    path = Path(path)
    if not path.is_file():
        raise refused(path, "no such probe file", key="probes", hint="check the path")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise refused(
            path,
            f"larger than {MAX_JSON_BYTES} bytes, too large for a probe file",
            key="probes",
            hint="probes are a few hundred short inputs",
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise refused(
            path, f"not UTF-8 text ({err.reason} at byte {err.start})", key="probes", hint="save the file as UTF-8"
        ) from None
    items: list[tuple[int, Any]] = []
    if path.suffix == ".txt":
        items = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            data = loads_bounded(text, path, what="probe file", error=ConfigError, hint="fix the file, or use .jsonl")
        except ConfigError as err:
            err.key = "probes"
            raise
        if not isinstance(data, list):
            raise refused(
                path, "expected a list of probes", key="probes", hint='e.g. [[1, 2, 3], {"text": "a photo of"}]'
            )
        items = list(enumerate(data, 1))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = loads_bounded(
                    line,
                    path,
                    what=f"the probe on line {n}",
                    error=ConfigError,
                    hint='one probe per line: [1, 2, 3], {"input_ids": [...]} or {"text": "..."}',
                )
            except ConfigError as err:
                err.key = "probes"
                raise
            items.append((n, item))
    tokenizer = None
    probes = []
    for n, item in items:
        if isinstance(item, Mapping):
            item = item.get("input_ids", item.get("text"))
        if isinstance(item, str):
            if tokenizer is None:
                tokenizer = _tokenizer(tokenizer_dir, path)
            item = tokenizer(item)["input_ids"]
        if not (
            isinstance(item, list)
            and item
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item)
        ):
            raise refused(
                path,
                "a probe must be a non-empty list of token ids or a text",
                key="probes",
                hint='e.g. [1, 2, 3], {"input_ids": [1, 2, 3]} or {"text": "a photo of"}',
                line=n,
            )
        probes.append(list(item))
    if not probes:
        raise refused(path, "holds no probe", key="probes", hint="add one probe per line")
    return probes


def _tokenizer(directory: str | Path | None, probes: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise refused(
            probes,
            f"text probes need the model's tokenizer, which {directory} does not provide ({err})",
            key="probes",
            hint="give token ids instead: one [1, 2, 3] per line",
        ) from None
