"""Errors the CLI turns into exit codes and one-line messages (never a traceback)."""

from __future__ import annotations


class PoisonguardError(Exception):
    exit_code = 3


class InputError(PoisonguardError):
    """Bad invocation, config or input: exit 2, nothing published."""

    exit_code = 2
    marker = "poisonguard-input-error"

    def __init__(self, message: str, *, path: str | None = None, column: str | None = None):
        where = ", ".join(part for part in (f"file {path}" if path else "", f"column {column!r}" if column else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(InputError):
    pass


class IntegrityError(PoisonguardError):
    """A bug caught by an invariant (e.g. rows in != clean + quarantine): exit 3, nothing published."""

    exit_code = 3


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def as_reported(exc: BaseException) -> BaseException:
    """The error to report: our own one where a runner wrapped it, a full disk or an unwritable
    output as bad input (exit 2), anything else as it is."""
    seen = exc
    while seen is not None:
        if isinstance(seen, PoisonguardError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, OSError) and exc.errno is not None:
        return InputError(f"cannot write the outputs: {exc.strerror}", path=getattr(exc, "filename", None))
    return exc
