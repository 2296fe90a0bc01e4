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


def invalid(name: str, value, allowed: str) -> str:
    """The one wording of a refused value, wherever it is checked (config, sampling, CLI,
    HTTP), so a user learns one shape and tests can match it."""
    return f"{name}={value!r} is invalid; allowed: {allowed}"


EXIT_ERROR = 2  # a problem the user can fix (one line on stderr)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, as a shell reports SIGINT


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (compile and database errors span pages)."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one line for an exception a stage or the CLI ends with, or None
    for one that is a bug (a traceback is then the useful report)."""
    if isinstance(exc, TrainingInterrupted):
        return EXIT_INTERRUPTED, f"interrupted: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted" + (f": {exc}" if str(exc) else "")
    if isinstance(exc, (GptcoreError, FloatingPointError)):
        # One line: some messages (a YAML parser's) span several with a caret diagram.
        return EXIT_ERROR, "error: " + " ".join(str(exc).split())
    if isinstance(exc, OSError):  # a full disk, a read-only or vanished directory, ...
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_ERROR, f"error: {exc.strerror or exc}{where}"
    return None

