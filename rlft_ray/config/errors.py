"""The one error type of the schema: every message names the dotted key at fault."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range. The message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.reason = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with both arguments: Ray ships errors raised in actors and Tune trials.
        return (type(self), (self.key, self.reason))


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, message)
