"""Errors meant for the user, how every entry point reports them, and the checks that raise them for settings.

A `UserError` says what is wrong, where, and what to do. Entry points (and the Hydra callbacks they run)
wrap their work in `exit_on_user_error`, the one place that turns it into one line `error: <message>` on
stderr (the same line goes into the run's log file, not to the console a second time) and exit status 2.
Anything else is a bug and keeps its traceback.
"""

import contextlib
import logging
import math
import sys
from collections.abc import Iterable
from numbers import Real

from hydra.errors import InstantiationException

log = logging.getLogger("retinaseg")

EXIT_STATUS = 2


class UserError(Exception):
    """A problem the user can fix, worded for them (what, which file or setting, what to do)."""


class DataError(UserError):
    """Input data or a model file that cannot be used: missing, damaged, of the wrong kind."""


class ConfigError(UserError):
    """A setting outside its allowed values, or a run directory that cannot be used as asked."""


class DivergedError(UserError):
    """Training produced non-finite numbers (NaN or infinity) and was stopped."""


class DiskFullError(UserError):
    """A file could not be written because the disk (or a quota) is full."""


def user_error_of(error: BaseException) -> UserError | None:
    """`error` itself, or the UserError Hydra wrapped while building an object from the config; else None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, UserError) else None


@contextlib.contextmanager
def exit_on_user_error():
    """Report a UserError raised inside as one line `error: ...` on stderr (and in the run's log file), exit with
    status 2."""
    try:
        yield
    except Exception as error:
        found = user_error_of(error)
        if found is None:
            raise
        line = f"error: {found}"
        log_to_files(logging.ERROR, line)
        print(line, file=sys.stderr)
        sys.exit(EXIT_STATUS)


def log_to_files(level: int, message: str) -> None:
    """`message` to the log files of the root logger's handlers (the run's `<task>.log`) only: the console
    already shows it on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


# Checks of settings, used where each setting is read: each returns the value or raises a ConfigError
# that names the setting, the value given and the values allowed.


def check_choice(name: str, value, choices: Iterable):
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"{name} must be one of {shown}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}")
    return value


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, or_one_of: tuple = ()):
    """An integer in [minimum, maximum] (either bound may be open), or one of the values `or_one_of` (e.g. null or
    "val"), returned as it is."""
    if any(value is other or (isinstance(value, str) and value == other) for other in or_one_of):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not _within(value, minimum, maximum, True, True):
        others = "".join(f" or {'null' if other is None else other}" for other in or_one_of)
        raise ConfigError(f"{name} must be an integer{_range(minimum, maximum, True, True)}{others}; got {value!r}")
    return value


def check_number(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    include_minimum: bool = True,
    include_maximum: bool = True,
    or_one_of: tuple = (),
):
    """A finite number between `minimum` and `maximum` (each bound included unless said otherwise), or one of
    the values `or_one_of` (e.g. null or "val"), returned as it is."""
    if any(value is other or (isinstance(value, str) and value == other) for other in or_one_of):
        return value
    ok = (
        isinstance(value, Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and _within(value, minimum, maximum, include_minimum, include_maximum)
    )
    if not ok:
        allowed = _range(minimum, maximum, include_minimum, include_maximum)
        others = "".join(f" or {'null' if other is None else other}" for other in or_one_of)
        raise ConfigError(f"{name} must be a number{allowed}{others}; got {value!r}")
    return float(value)


def _within(value, minimum, maximum, include_minimum: bool, include_maximum: bool) -> bool:
    above = minimum is None or (value >= minimum if include_minimum else value > minimum)
    below = maximum is None or (value <= maximum if include_maximum else value < maximum)
    return above and below


def _range(minimum, maximum, include_minimum: bool, include_maximum: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'[' if include_minimum else '('}{minimum}, {maximum}{']' if include_maximum else ')'}"
    if minimum is not None:
        return f" {'>=' if include_minimum else '>'} {minimum}"
    if maximum is not None:
        return f" {'<=' if include_maximum else '<'} {maximum}"
    return ""
