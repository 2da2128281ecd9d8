"""Where mmer may read: inside a model's own directory, or its Hugging Face cache repo folder, and nowhere else.

A model directory downloaded from a stranger may hold symlinks (``tokenizer.json -> /proc/self/environ``) that
would pull files from the user's machine into a published artifact. The Hub cache itself is made of links
(``snapshots/<commit>/x -> ../../blobs/<sha>``), so links are followed only while they resolve inside the
directory or, for a snapshot, inside its ``models--org--name`` repo folder. People who keep weights on shared
storage and link to them opt in with ``MMER_ALLOW_EXTERNAL_LINKS=1`` (or :func:`set_allow_external_links`).
"""

from __future__ import annotations

import os
from pathlib import Path

from mmer.errors import UnsafePathError

ENV_ALLOW_EXTERNAL_LINKS = "MMER_ALLOW_EXTERNAL_LINKS"
_allow_external_links: bool | None = None


def set_allow_external_links(allowed: bool | None) -> None:
    """Opt in (or out) of following links that leave a model's directory; ``None`` defers to the environment."""
    global _allow_external_links
    _allow_external_links = allowed


def external_links_allowed() -> bool:
    if _allow_external_links is not None:
        return _allow_external_links
    return os.environ.get(ENV_ALLOW_EXTERNAL_LINKS, "0").lower() in ("1", "true", "yes", "on")


def allowed_roots(directory: str | Path) -> tuple[Path, ...]:
    """The resolved directory, plus its Hub cache repo folder when the directory is a cache snapshot."""
    real = Path(os.path.realpath(directory))
    roots = [real]
    plain = Path(os.path.abspath(directory))
    for candidate in (plain, real):
        # <cache>/models--org--name/snapshots/<commit>[/sub] : the repo folder holds the blobs the links point to
        parts = candidate.parts
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] == "snapshots" and parts[i - 1].split("--")[0] in ("models", "datasets", "spaces"):
                roots.append(Path(os.path.realpath(Path(*parts[:i]))))
                break
    return tuple(dict.fromkeys(roots))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_inside(directory: str | Path, path: str | Path, *, what: str = "file") -> Path:
    """The real path of ``path``, refused unless it resolves inside ``directory`` (or its Hub cache repo folder).

    ``path`` may be relative to ``directory``. Returns the resolved path, which callers should open instead of
    ``path`` so that a link swapped in afterwards changes nothing.
    """
    directory = Path(directory)
    candidate = Path(path) if Path(path).is_absolute() else directory / path
    real = Path(os.path.realpath(candidate))
    roots = allowed_roots(directory)
    if any(_within(real, root) for root in roots) or external_links_allowed():
        return real
    raise UnsafePathError(
        f"{candidate}: this {what} resolves to {real}, outside {directory}",
        file=str(candidate),
        hint=(
            "a model directory may only link inside itself (or its Hugging Face cache folder); this file may be "
            f"hostile. If you linked it yourself on purpose, set {ENV_ALLOW_EXTERNAL_LINKS}=1"
        ),
    )
