"""The user's mistakes, by kind: each becomes one ``error:`` line and its exit status; anything else stays a
traceback."""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Optional

from mnist_dlops.importguard import guarded_imports
from mnist_dlops.quiet import quiet
from mnist_dlops.writeguard import WriteRefused, guarded_writes

# File-system errors that are the user's to fix: a disk full or over quota, a file too large for the limit, a
# read-only file system, no permission, a path that is missing, a file or a folder. Any other OSError (a socket, a
# bad file descriptor...) is a programming error and stays a traceback.
USER_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
})


class UserError(Exception):
    """A mistake the user can fix; the message names the key, value or file and says what to do."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config value that parses but cannot be used (or may not be built); the message names the key and value."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint file that is missing or cannot be used; the message names the file and what to do."""

    exit_code = 2


class DataError(UserError, ValueError):
    """A data file or folder that cannot be used; the message names it and says what is wrong."""


class ArgumentsError(UserError):
    """A command line or config file the parser refuses; not a ``ValueError``, which jsonargparse would catch."""

    exit_code = 2


class DivergedError(UserError):
    """Training produced a NaN or infinite loss or weights; it stopped before saving a diverged model."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Every command's outer frame: imports and writes are gated (``mnist_dlops.importguard``,
    ``mnist_dlops.writeguard``) and libraries' noise silenced (``mnist_dlops.quiet``) for the whole command, and a
    ``UserError`` or a user's file-system error becomes one ``error:`` line and its exit status (the error's
    ``exit_code``; 1 for a path that cannot be written); anything else propagates.

    A library's writer thread (TensorBoard's event writer) that fails on a full or read-only disk is the same error:
    Python's ``threading.excepthook`` would print its traceback; the file it names goes into the one line instead."""
    in_threads: list[OSError] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in USER_ERRNOS:
            in_threads.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        with guarded_imports(), guarded_writes() as writes, quiet():
            try:
                yield
            except BaseException as err:  # a refused write is the news, whatever a library made of it
                if not writes.refused or isinstance(err, WriteRefused):
                    raise
                raise WriteRefused(writes.refused[0], "") from err
            if writes.refused:  # a library caught it and went on: what was asked for was not written
                raise WriteRefused(writes.refused[0], "")
        if in_threads:  # the command itself went on: what the thread wrote is lost all the same
            raise in_threads[0]
    except (UserError, WriteRefused) as err:
        fail(str(err), err.exit_code)
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        named = err if err.filename else next((e for e in in_threads if e.filename), err)
        # A copy or a rename that fails for want of space or permission names both files: the destination is news.
        target = named.filename2 if named.filename2 and err.errno != errno.ENOENT else named.filename
        where = os.fsdecode(target) if target else "writing the run's files"
        fail(f"{where}: {err.strerror or err}", 1)
    finally:
        threading.excepthook = previous


def command(components: Any, argv: Optional[list[str]], name: str, **kwargs: Any) -> Any:
    """A command beside training (``runs``, ``datasets``...): jsonargparse's ``CLI`` over its functions, inside
    ``user_errors``, with a refused argument as one ``error:`` line and exit status 2 instead of a usage dump."""
    from jsonargparse import CLI, ArgumentParser

    class OneLine(ArgumentParser):
        def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
            if not self.exit_on_error:  # jsonargparse parses tentatively with errors raised, then retries: let it
                super().error(message, ex)
            raise ArgumentsError(one_line(f"{message} (see {invoked(name)} --help)"))

    with user_errors():
        return CLI(components, args=argv, prog=invoked(name), parser_class=OneLine, **kwargs)


def fail(message: str, status: int) -> None:
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


TRAINING = ("fit", "validate", "test", "predict")


def invoked(command: str) -> str:
    """``command`` (``test``, ``datasets add``...) as a hint names it: ``python cli.py test`` for LightningCLI's
    subcommands, ``mnist-dlops datasets add`` for every other (the project's two spellings)."""
    return f"{'python cli.py' if command.split(' ')[0] in TRAINING else 'mnist-dlops'} {command}"


def one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's multi-line message as one line: its lines joined, spaces collapsed, cut at ``limit``."""
    text = re.sub(r"\s+", " ", " ".join(line.strip() for line in str(message).splitlines() if line.strip()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(err: object, limit: int = 160) -> str:
    """A library's exception as the reason in one of our lines: its first line, cut at ``limit``, else its type."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
