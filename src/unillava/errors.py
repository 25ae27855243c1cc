"""User-facing errors: raised for bad input, printed by the CLI as one line without a traceback."""

from __future__ import annotations


class UnillavaError(Exception):
    """Bad input from the user (a file, a line, a field, a flag). The message names where it is."""


class DataError(UnillavaError):
    """A dataset file, line, field or image is malformed."""


class CheckpointError(UnillavaError):
    """A checkpoint directory is missing files or has a layout we cannot read."""


class ConfigError(UnillavaError):
    """A YAML config or a key=value override names an unknown field or has a wrong type."""
