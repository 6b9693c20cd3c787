"""Typed errors. Each message states what was expected, what was found, and the fix.

The CLI maps them to exit codes: bad input (config, data, checkpoint, export) exits 2,
a verification that ran but failed its thresholds exits 1.
"""


class DeployKitError(Exception):
    exit_code = 2


class ConfigError(DeployKitError):
    """A malformed or inconsistent result.json, option, or checkpoint."""


class DataError(DeployKitError):
    """A dataset spec, folder or file that cannot be used."""


class CheckpointError(DeployKitError):
    """A missing, corrupt or mismatched teacher checkpoint."""


class ExportError(DeployKitError):
    """A graph that cannot be rewritten or converted."""


class OutputExistsError(DeployKitError):
    """An output that already exists and --force was not given."""


class VerificationError(DeployKitError):
    """An export ran but disagrees with the reference beyond the thresholds."""

    exit_code = 1
