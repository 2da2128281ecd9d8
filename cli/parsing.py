"""Option values that name a modality: ``MODALITY=PATH`` pairs, parsed one way for every command that takes them."""

from __future__ import annotations

from mmer.errors import ConfigError


def pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """``["vision=/models/llava", ...]`` as ``{"vision": "/models/llava"}``; anything else is refused by flag."""
    out = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(
                f"{flag} {item!r} is not MODALITY=PATH", key=flag.lstrip("-"), hint=f"e.g. {flag} vision=/models/llava"
            )
        out[name.strip()] = value.strip()
    return out
