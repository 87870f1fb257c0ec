"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class ProtoADError(Exception):
    """Base class: a problem with the user's input, artifacts or environment, not a bug."""

    exit_code = 2


class InputError(ProtoADError, ValueError):
    """Bad data or option values."""


class ArtifactError(ProtoADError):
    """A bundle that is missing, tampered with, or made by an incompatible version."""

    exit_code = 3


class MissingDependencyError(ProtoADError):
    """Something the requested operation needs is not installed or not present (TensorRT, a GPU, weights)."""

    exit_code = 4


class ToleranceError(ProtoADError):
    """A backend's output differs from the reference by more than the allowed tolerance."""

    exit_code = 5


class ResourceError(ProtoADError):
    """Not enough memory or disk for the requested work (checked before it starts, or met while writing)."""

    exit_code = 6
