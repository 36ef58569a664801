"""One exception tree for everything a user can cause.

    XrecError
    ├── ConfigError          bad settings or a bad platform config file
    ├── StackError           the embedded broker / Redis could not be started or reached
    └── InputFileError       a replay / catalog / eval input file cannot be read

Bad *events* are not exceptions: they are data, routed to the dead-letter topic
(see :mod:`streams.normalize`).
"""

from __future__ import annotations

__all__ = ["XrecError", "ConfigError", "StackError", "InputFileError"]


class XrecError(Exception):
    """Base of every error xrec raises on purpose. The message says what to do."""


class ConfigError(XrecError):
    """Settings or a platform config file are invalid."""


class StackError(XrecError):
    """A service of the stack (broker, Redis, worker) could not be started or reached."""


class InputFileError(XrecError):
    """An input file (event log, catalog) cannot be read."""
