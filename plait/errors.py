"""Errors plait raises for bad input: each names the field and the fix."""


class PlaitError(Exception):
    """Base of plait's own errors."""


class ConfigError(PlaitError, ValueError):
    """An invalid configuration value, key, file or combination, found before any work starts."""
