"""Errors plait raises for bad input: each names the field and the fix."""


class PlaitError(Exception):
    """Base of plait's own errors."""


class NonFiniteError(PlaitError, RuntimeError):
    """Training cannot go on: non-finite losses or gradients that skipping steps does not cure."""


class ConfigError(PlaitError, ValueError):
    """An invalid configuration value, key, file or combination, found before any work starts."""
