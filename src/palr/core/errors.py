"""Exceptions that the CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class PalrError(Exception):
    """Base class for user-facing errors (bad input, missing files, incompatible runs)."""


class DataError(PalrError):
    """A data file is malformed; names the file and the line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class MissingDataError(PalrError):
    """An expected data file is absent."""


class RunError(PalrError):
    """A run directory is missing, incomplete, or belongs to another data set or version."""


class InputError(PalrError):
    """A request is invalid (out-of-range ``k``, too long a history, user and history together, ...):
    exit 2 on the command line, 422 in the HTTP service."""


class UnknownUserError(PalrError):
    """A user id the run's data set does not hold (404 in the HTTP service)."""


class LLMUnavailable(PalrError):
    """An LLM backend cannot be reached (connection refused, timeouts) after its retries.

    Commands stop on it with one line unless the user allowed a fallback to the retriever (``--allow-fallback``).
    """


class LLMRequestFailed(PalrError):
    """An LLM server answered, but not usably, after its retries (server errors, malformed answers).

    Like :class:`LLMUnavailable`, a failure of the backend rather than of palr: with ``--allow-fallback`` the
    ranker's fallback order stands for the users concerned; without it the command stops."""


class ConfigError(PalrError):
    """A flag, ``--param`` or config-file value is unknown or has the wrong type; names the valid choices."""
