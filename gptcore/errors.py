"""The errors a user can fix. Each is one clear line: what is wrong, where, what is allowed.

They share one base, :class:`GptcoreError`, so a stage (or the CLI) turns every one of
them into a one-line message and exit code 2 without importing the modules that raise
them, and without a traceback. Kept free of torch so that importing it is instant.
"""

from __future__ import annotations


class GptcoreError(Exception):
    """Base of every error that is the user's to fix (bad params, data, checkpoint...)."""


class ConfigError(GptcoreError, ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


class DataError(GptcoreError, RuntimeError):
    """A source could not be fetched or failed verification, or data files are malformed."""


class TokenizerError(GptcoreError, ValueError):
    """Text that cannot be encoded, or tokenizer files that are missing or corrupt."""


class CheckpointError(GptcoreError, RuntimeError):
    """A checkpoint directory is missing, corrupt, unsafe or does not match its config."""


class TrainingInterrupted(GptcoreError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""
