"""Errors a user can cause. The command line prints their message as one line on stderr and
exits with status 2; library callers can catch :class:`BiogradError`."""


class BiogradError(Exception):
    """An error caused by the user's input (config, data, options), not by a bug."""


class ConfigError(BiogradError):
    """An invalid experiment configuration or override."""


class DataError(BiogradError):
    """A missing, truncated or corrupt data file, or an unknown dataset."""


class DivergedError(BiogradError):
    """Training produced a non-finite loss."""
