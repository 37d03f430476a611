"""The command-line contract every entry point follows (`python -m mlic_dist.X`, launch/sweep.py):

    @entry_point
    def main(argv=None) -> int: ...          # parse, build, call one function; return the status
    if __name__ == "__main__":
        sys.exit(main())

- `UserError` (mlic_dist/errors.py): one line `error: MESSAGE` on stderr, no traceback, status 2.
- `RunFailure` (divergence, a failed export check): one line, status 1.
- Ctrl-C: one line `interrupted`, status 130.
- Anything else is a bug: the traceback is kept.
The line is written with one `write` call, so the lines of several ranks never interleave.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Sequence

from .errors import RunFailure, UserError

USER_ERROR = 2
RUN_FAILURE = 1
INTERRUPTED = 130


def error_line(message: object) -> None:
    """`error: MESSAGE` on stderr as one write (several ranks may print at once)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def entry_point(main: Callable[[Optional[Sequence[str]]], Optional[int]]) -> Callable[..., int]:
    """Wrap an entry point's `main(argv)` in the contract above; the wrapper returns the status."""

    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None) -> int:
        try:
            status = main(argv)
        except UserError as e:
            error_line(e)
            return USER_ERROR
        except RunFailure as e:
            error_line(e)
            return RUN_FAILURE
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            return INTERRUPTED
        return 0 if status is None else int(status)

    return run
