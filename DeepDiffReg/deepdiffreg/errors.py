"""Errors that end a run with a one-line message and a distinct exit code (see progress.ExitCode)."""
from __future__ import annotations

from .progress import ExitCode


class RegistrationError(Exception):
    """An expected failure: the CLI prints ``message`` on one line and exits with ``code``."""

    code = ExitCode.ERROR

    def __init__(self, message: str, code: ExitCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BadInput(RegistrationError):
    code = ExitCode.BAD_INPUT


class DeviceUnavailable(RegistrationError):
    code = ExitCode.DEVICE_UNAVAILABLE


class OutOfMemory(RegistrationError):
    code = ExitCode.OUT_OF_MEMORY


class Cancelled(RegistrationError):
    code = ExitCode.CANCELLED


class MissingWeights(RegistrationError):
    code = ExitCode.MISSING_WEIGHTS
