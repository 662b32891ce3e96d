"""The one exception type for what a user got wrong, and the one handler that turns it into a message.

A module of its own because every layer raises it (list readers, checkpoint loading, the data checks, the
flags), so it sits below all of them in the import graph. Library code raises `UserError` naming the flag,
file or list line; each command-line entry point runs inside `reported_as_exit`, which prints that message as
one line and exits with the error's status: 2 for a usage mistake (flags), 1 for bad data. A notebook user
sees a `ValueError` with the same message. A `UserError` raised in a DataLoader worker reaches the main
process wrapped in the worker's traceback; the handler prints only the original message.
"""

import argparse
import contextlib
import re
import sys


class UserError(ValueError):
    """Something the user gave cannot be used (a file, a list line, a checkpoint); the message says which."""
    exit_status = 1


class UsageError(UserError):
    """A flag, or a combination of flags, that cannot work."""
    exit_status = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown flag, a bad value) are `UsageError`s, reported like the others."""

    def error(self, message):
        raise UsageError(message)


def message_of(error):
    """The error's own message: for one re-raised from a DataLoader worker ("Caught UserError in DataLoader
    worker process 0. Original Traceback ..."), the message on the traceback's last line."""
    message = str(error)
    if '\nOriginal Traceback' in message:
        message = re.sub(r'^[\w.]+: ', '', message.rstrip().splitlines()[-1])
    return message


def first_line(error):
    """The first line of an exception's text, or its type's name when it has no text (an empty file's EOFError)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def reported_as_exit(program):
    """A `UserError` raised inside becomes `program: error: message` on stderr and exit status 1 or 2; Ctrl-C
    becomes `program: interrupted` and exit status 130."""
    try:
        yield
    except UserError as error:
        print(f'{program}: error: {message_of(error)}', file=sys.stderr, flush=True)
        raise SystemExit(error.exit_status) from None
    except KeyboardInterrupt:  # Ctrl-C outside training steps, or twice inside: stop now, as the shell expects
        print(f'\n{program}: interrupted', file=sys.stderr, flush=True)
        raise SystemExit(130) from None
