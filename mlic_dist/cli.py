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
Under torchrun (and `accelerate launch` with several processes, which runs torchrun's launcher)
the same line also goes to the error file torchrun names in TORCHELASTIC_ERROR_FILE, in the
JSON that `torch.distributed.elastic.multiprocessing.errors.record` writes, so torchrun's
failure summary shows `error: MESSAGE` where it would say "To enable traceback see ...".
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

from .errors import RunFailure, UserError

USER_ERROR = 2
RUN_FAILURE = 1
INTERRUPTED = 130


ELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"   # set by torchrun's agent for each worker


def error_line(message: object) -> None:
    """`error: MESSAGE` on stderr as one write (several ranks may print at once), and into
    torchrun's error file when this process is a torchrun worker."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    _record_for_torchrun(f"error: {message}")


def _record_for_torchrun(line: str) -> None:
    """The worker's error file in torch elastic's format ({"message": {"message", "extraInfo":
    {"py_callstack", "timestamp"}}}; its summary prints py_callstack): our one line instead of a
    traceback. Best effort: a file that cannot be written changes nothing else."""
    path = os.environ.get(ELASTIC_ERROR_FILE)
    if not path:
        return
    doc = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(doc, f)
    except OSError:
        pass


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
