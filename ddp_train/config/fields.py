"""What every config section is built from: the error type and the field/check helpers.

Imports nothing of ddp-train, so every config module (and anything else) may import it.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad config value or key; the message is one line meant for the user."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line ConfigError ``key: msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")
