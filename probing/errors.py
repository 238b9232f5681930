"""Errors that name the problem and the fix.

Every error the toolkit raises on bad input is a :class:`WordposError`, so a CLI can print one clear
line instead of a traceback, and a notebook user can ``except WordposError``.
"""

from __future__ import annotations

import errno


class WordposError(Exception):
    """Base class: the message says what was wrong, what was received and how to fix it."""


class ModelNotAvailableError(WordposError):
    """The model's weights cannot be had here (no hub access, no local copy)."""


class ConfigError(WordposError, ValueError):
    """A setting is out of range or inconsistent (layer index, heads, sizes, ...)."""


class TokenizationError(WordposError, ValueError):
    """A word or prompt does not tokenize as the experiment needs."""


class RunDirError(WordposError):
    """An output directory holds another run's results (use ``--overwrite``) or is not ours."""


class CorruptFileError(WordposError):
    """A saved file (results, cache, graph) is truncated, malformed or from something else."""


class DiskFullError(WordposError, OSError):
    """The disk being written to is full (or over quota). Raised before the write where the size is known, else
    when the write fails; the half-written file is removed and what was written before is intact. An ``OSError``
    with ``errno`` ENOSPC, so code that handles a full disk already catches it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC
