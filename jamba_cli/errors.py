"""Every error the package reports to a person: one class per kind of failure, each with a one-line message.

A message speaks the Python API's words: it names a parameter in backticks (`context_size`), and the CLI
shows the flag that sets it there instead (`--ctx-size`); `SamplingError` carries its parameter as an
attribute instead. `exit_code` is the CLI's exit status.
"""


class JambaError(Exception):
    """Base class for errors that are reported to the user in one line; `exit_code` is the CLI's status."""

    exit_code = 1


class UsageError(JambaError, ValueError):
    """The caller asked for something impossible: a bad or contradictory argument (exit status 2, like a
    bad flag)."""

    exit_code = 2


class SamplingError(UsageError):
    """A sampling option out of its range. `param` is the option (a `SamplingParams` field), `rule` the range
    with `{}` where the option's name goes, so that the CLI and the chat can state it in their own names."""

    def __init__(self, param: str, value, rule: str):
        super().__init__(f"{param}: {value} is out of range ({rule.format(param)})")
        self.param, self.value, self.rule = param, value, rule


class DeviceMapError(UsageError):
    """A device, device map or `max_memory` that cannot place the model: unknown modules or devices, or too
    little memory for the weights."""


class ConfigError(JambaError, ValueError):
    """config.json is missing, malformed, or describes something that is not a Jamba model."""


class CheckpointError(JambaError):
    """Weights or tokenizer files are missing, corrupt, or do not match the config."""


class ChatTemplateError(JambaError):
    """The chat template failed to render, or the checkpoint has no chat format."""


class ContextOverflowError(JambaError):
    """The prompt does not fit in the context window."""


class PromptCacheError(JambaError):
    """The prompt cache file cannot be used with this model."""


class HubError(JambaError):
    """A Hub download failed; the message is one line and never contains the token."""


class DependencyError(JambaError):
    """An optional dependency that the requested feature needs is not installed."""
