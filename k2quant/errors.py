"""Errors k2quant raises on bad input.

Every error names the file, tensor or field at fault, so a user with a 1 TB checkpoint
can find the one broken piece without a debugger.
"""

from __future__ import annotations


class K2QuantError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(K2QuantError):
    """config.json is unknown, inconsistent or unsupported; names the field."""

    def __init__(self, field: str, message: str, path: str | None = None):
        where = f"{path}: " if path else ""
        super().__init__(f"{where}config field '{field}': {message}")
        self.field = field
        self.path = path


class CheckpointError(K2QuantError):
    """A checkpoint file, index or tensor is missing, truncated or inconsistent."""

    def __init__(self, message: str, file: str | None = None, tensor: str | None = None):
        parts = []
        if file:
            parts.append(str(file))
        if tensor:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = file
        self.tensor = tensor
