"""One exception root for the project, so callers (CLI, gRPC layer) map errors in one place."""

from __future__ import annotations


class DefcnnError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(DefcnnError, ValueError):
    """A setting or argument is invalid; the message names it and what was expected."""


class DataError(DefcnnError):
    """A data set is missing, malformed or failed verification."""


class CheckpointError(DefcnnError):
    """A checkpoint is missing, malformed or unsafe to load."""


class ExportError(DefcnnError):
    """An export failed or did not verify; nothing half-written is left behind."""
