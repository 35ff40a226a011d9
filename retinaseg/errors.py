"""Errors meant for the user, and how entry points report them: one message, non-zero exit, no traceback."""

import contextlib
import logging
import sys

log = logging.getLogger("retinaseg")


class DataError(Exception):
    """A problem with input data, a checkpoint or a setting, worded for the user (what, which file, what to do)."""


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except DataError as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
