"""User-facing errors: each carries a one-line message the CLI prints as is."""


class JambaError(Exception):
    """Base class for errors that are reported to the user in one line; `exit_code` is the CLI's status."""

    exit_code = 1


class UsageError(JambaError):
    """The command line asks for something impossible (exit status 2, like a bad flag)."""

    exit_code = 2


class ConfigError(JambaError, ValueError):
    """config.json is missing, malformed, or describes something that is not a Jamba model."""


class CheckpointError(JambaError):
    """Weights or tokenizer files are missing, corrupt, or do not match the config."""


class DeviceMapError(UsageError, ValueError):
    """A device, device map or --max-memory that cannot place the model: unknown modules or devices, or too
    little memory for the weights."""


class DependencyError(JambaError):
    """An optional dependency that the requested feature needs is not installed."""
