"""Errors a user can act on. The CLI prints their message without a traceback."""

from __future__ import annotations


class AlignlabError(Exception):
    """Base class for errors whose message tells the user what to fix."""


class ConfigError(AlignlabError):
    """A config value or name is invalid; the message names the field and allowed values."""


class DataError(AlignlabError):
    """A data row is malformed. The message reads ``file:line: field 'x': problem``."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.source, self.line, self.field, self.problem = source, line, field, message
        where = source or "<data>"
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class NonFiniteError(AlignlabError):
    """A loss, gradient or reward became NaN or infinite; training stops."""


class RewardError(AlignlabError):
    """A reward function raised, timed out, or returned a non-finite value."""


class TrainingError(AlignlabError):
    """Training ran but produced no update (every step was skipped)."""


class AlignlabWarning(UserWarning):
    """Something a user should know that does not stop the run (``core/notices.py`` shows each
    cause once); the CLI prints it as one ``warning:`` line."""
