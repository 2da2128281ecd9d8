"""Which licence each merged model is under, read from what its publisher wrote, for the output's model card.

A model directory declares its licence in its model card's YAML front matter (``license:``, the Hub's field), now
and then in ``config.json``, or only as a LICENSE text; the card reads them in that order and recognises the
common texts by their own opening words. Nothing is guessed beyond that: a model whose licence cannot be read is
*unknown*, and an output merged from models whose licences are unknown or differ says ``license: other`` and
warns, since publishing a merge is the moment its terms matter. The files read are untrusted (a stranger's
download): each must resolve inside its model's directory or Hub cache folder (:mod:`mmer.io.paths`), be a
regular file, and only a bounded prefix is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmer.checkpoint.manifest import SourceRecord
from mmer.errors import MmerError
from mmer.io.jsonfile import read_json_file
from mmer.io.paths import check_inside, regular_file
from mmer.io.reader import LICENCE_FILE

MAX_CARD_BYTES = 1 << 20  # a model card's front matter sits at its top; a megabyte is far past any real one
MAX_LICENCE_BYTES = 1 << 16  # a licence is recognised by its first lines
UNKNOWN = None

# (Hub licence id, phrases that must all appear, case-insensitively) — first match wins, most specific first.
KNOWN_TEXTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("apache-2.0", ("apache license", "version 2.0")),
    ("mit", ("permission is hereby granted, free of charge",)),
    ("bsd-3-clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("bsd-2-clause", ("redistribution and use in source and binary forms",)),
    ("agpl-3.0", ("gnu affero general public license", "version 3")),
    ("lgpl-3.0", ("gnu lesser general public license", "version 3")),
    ("gpl-3.0", ("gnu general public license", "version 3")),
    ("gpl-2.0", ("gnu general public license", "version 2")),
    ("cc-by-nc-sa-4.0", ("attribution-noncommercial-sharealike 4.0 international",)),
    ("cc-by-nc-4.0", ("attribution-noncommercial 4.0 international",)),
    ("cc-by-sa-4.0", ("attribution-sharealike 4.0 international",)),
    ("cc-by-4.0", ("attribution 4.0 international",)),
    ("llama3.3", ("llama 3.3 community license",)),
    ("llama3.2", ("llama 3.2 community license",)),
    ("llama3.1", ("llama 3.1 community license",)),
    ("llama3", ("meta llama 3 community license",)),
    ("llama2", ("llama 2 community license",)),
    ("gemma", ("gemma terms of use",)),
)
_HUB_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


@dataclass
class SourceLicence:
    """One merged model's licence as its files declare it, and where that was read."""

    label: str  # "base" or the modality
    model: str
    licence: str | None = UNKNOWN  # a Hub licence id ("apache-2.0"), "other", or None when nothing says
    name: str | None = None  # license_name, when the model's card gives one with `license: other`
    read_from: str | None = None  # "model card", "config.json" or the licence file's name
    files: list[str] = field(default_factory=list)  # licence files of this model in the output, relative


def source_licence(label: str, record: SourceRecord, directories: list[Path]) -> SourceLicence:
    """The licence of the model ``record`` names, read from the first of ``directories`` that declares one."""
    found = SourceLicence(label, record.model)
    for directory in directories:
        for reader in (_from_card, _from_config, _from_licence_file):
            try:
                result = reader(directory)
            except (MmerError, OSError, ValueError, yaml.YAMLError):
                result = None  # an unreadable or hostile declaration declares nothing; the card says unknown
            if result is not None:
                found.licence, found.name, found.read_from = result
                return found
    return found


def agreed(licences: list[SourceLicence]) -> tuple[str, str | None, str | None]:
    """``(license, license_name, warning)`` for the output: the sources' common licence, else ``other``."""
    ids = {s.licence for s in licences}
    if len(ids) == 1 and None not in ids and "other" not in ids:
        return ids.pop(), None, None
    unknown = [s.label for s in licences if s.licence is None]
    if unknown:
        why = f"no licence found for {', '.join(unknown)} (no `license:` in its model card, config or LICENSE file)"
        name = "unknown"
    else:
        listed = ", ".join(f"{s.label}: {s.licence if s.licence != 'other' else s.name or 'other'}" for s in licences)
        why = f"the merged models' licences differ ({listed})"
        name = "mixed"
    return "other", name, f"model card: {why}; it says `license: other`: set the licence before publishing the merge"


def licence_files(directory: Path) -> list[str]:
    """Names of the licence files directly in ``directory`` (an output folder mmer wrote), sorted."""
    try:
        return sorted(e.name for e in os.scandir(directory) if e.is_file() and LICENCE_FILE.fullmatch(e.name))
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------------------------- readers
def _read_prefix(directory: Path, name: str, limit: int) -> str | None:
    real = check_inside(directory, directory / name, what="licence source")
    if not regular_file(real, directory / name, what="licence source"):
        return None
    with open(real, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _declared(value: object, name: object = None) -> tuple[str, str | None] | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not _HUB_ID.fullmatch(value.strip().lower()):
        return None
    licence = value.strip().lower()
    return licence, (name.strip() if isinstance(name, str) and licence == "other" else None)


def _from_card(directory: Path) -> tuple[str, str | None, str] | None:
    text = _read_prefix(directory, "README.md", MAX_CARD_BYTES)
    if text is None or not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    meta = yaml.safe_load(text[3:end])
    if not isinstance(meta, dict):
        return None
    declared = _declared(meta.get("license"), meta.get("license_name"))
    return None if declared is None else (*declared, "model card")


def _from_config(directory: Path) -> tuple[str, str | None, str] | None:
    path = directory / "config.json"
    if not os.path.lexists(path):
        return None
    real = check_inside(directory, path, what="config")
    data = read_json_file(real, what="config") if regular_file(real, path) else None
    declared = _declared(data.get("license")) if isinstance(data, dict) else None
    return None if declared is None else (*declared, "config.json")


def _from_licence_file(directory: Path) -> tuple[str, str | None, str] | None:
    try:
        names = sorted(n for n in os.listdir(directory) if LICENCE_FILE.fullmatch(n) and not n.upper().startswith("N"))
    except OSError:
        return None
    for name in names:  # NOTICE files name no licence; LICENSE, LICENCE and COPYING do
        text = _read_prefix(directory, name, MAX_LICENCE_BYTES)
        licence = classify(text or "")
        if licence is not None:
            return licence, None, name
    return None


def classify(text: str) -> str | None:
    """The Hub licence id of a licence text, recognised by the phrases its own first lines carry."""
    lowered = " ".join(text.lower().split())
    for licence, phrases in KNOWN_TEXTS:
        if all(p in lowered for p in phrases):
            return licence
    return None
