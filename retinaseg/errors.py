"""Errors meant for the user, and how entry points report them: one message, non-zero exit, no traceback."""

import contextlib
import logging
import sys

from hydra.errors import InstantiationException

log = logging.getLogger("retinaseg")


class DataError(Exception):
    """A problem with input data, a checkpoint or a setting, worded for the user (what, which file, what to do)."""


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except (DataError, InstantiationException) as error:
        # Hydra wraps errors raised while building objects from the config; unwrap ours, re-raise others.
        if isinstance(error, InstantiationException):
            if not isinstance(error.__cause__, DataError):
                raise
            error = error.__cause__
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
