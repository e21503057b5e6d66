"""Errors the engine raises to its callers, whichever facade they use."""


class EngineDeadError(RuntimeError):
    """The engine can no longer run: a batch failed, or a tensor-parallel worker died (then every
    pending and later request fails with it)."""
