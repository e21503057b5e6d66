"""Exceptions raised while resolving a model name or reading its weights.

All derive from ``ModelLoadError`` (a ``ValueError``), so callers can catch one type; the messages
say what was wrong and what to do about it.
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be resolved or its files could not be read."""


class ModelNotFoundError(ModelLoadError):
    """The model name matched no alias, local path or hub-cache entry."""


class MissingModelPackageError(ModelLoadError):
    """A bundled alias needs a pip package that is not installed."""


class CorruptWeightsError(ModelLoadError):
    """A weights file exists but cannot be parsed."""
