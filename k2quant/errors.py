"""Errors k2quant raises on bad input (and on a full disk).

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


class DiskFullError(K2QuantError):
    """A write failed because the disk (or a quota) is full; names the file being written."""

    def __init__(self, file: str, detail: str = ""):
        super().__init__(
            f"{file}: disk full: no space left on the device to write this file{detail}; free space and run "
            "the command again (k2quant convert: with --resume, to keep the finished files)"
        )
        self.file = file
        self.detail = detail

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return type(self), (self.file, self.detail)
