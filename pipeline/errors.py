"""User errors and the one wrapper every console script runs in.

A user error is anything the user can fix (a bad config key, a missing shard, an unreadable run
directory): it is reported as one line on stderr naming the file, key or shard, with exit status 2
and no traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or files; the message is one line that says what to do."""


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names the key."""


class DataError(UserError):
    """Missing shards, a bad index, too much bad data; the message names the shard or index."""


class CheckpointError(UserError):
    """No usable checkpoint, or one that does not fit this run; the message names the directory."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def cli_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a console script's body: user errors become one line on stderr and exit 2."""
    try:
        return body() or 0
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
