"""Checking where a command will write BEFORE it works: a bad `--out` is one line naming the path
and the fix at the start, not a traceback after minutes of predicting, fusing or exporting.

    from mlic_dist.destination import check_file, check_dir
    check_file(args.out, "--out", PredictError)     # a file is wanted (its parent may not exist yet)
    check_dir(args.out, "--out", ReportError)       # a directory is wanted (may not exist yet)

A destination is good when it is not the wrong kind (a directory where a file is wanted, a
file where a directory is), and the nearest part of it that exists is a directory this process
can create files in (probed with a real temporary file: permission bits do not tell root about
/proc or a read-only mount). Nothing is created: a missing parent is made only when the command
writes. Each check raises the caller's own user-error class, so its CLI prints one line and
exits 2.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import UserError


def _existing_ancestor(path: Path) -> Path:
    """`path` itself, or its nearest ancestor that exists."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(flag: str, path: Path, where: Path, error: type[Exception]) -> None:
    """`where` (an existing ancestor of `path`, or path itself) is a directory we can write in."""
    if not where.is_dir():
        raise error(f"{flag} {path}: {where} is a file, so {path} cannot be created there; choose a path "
                    f"under a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".mlic-write-test-"):
            pass
    except OSError as e:
        raise error(f"{flag} {path}: cannot create files in {where} ({e.strerror or e}); choose a directory "
                    f"you can write to") from None


def check_file(path: str | Path, flag: str = "--out", error: type[Exception] = UserError,
               example: str = "") -> Path:
    """`path` can be written as a file (replacing a file there); returns it as a Path.
    `example`: a file name the message suggests inside a directory given by mistake."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{flag} {path} is a directory, and a file is written there; give a file path"
                    + (f" (e.g. {path / example})" if example else ""))
    _check_writable(flag, path, _existing_ancestor(path.absolute().parent), error)
    return path


def check_dir(path: str | Path, flag: str = "--out", error: type[Exception] = UserError) -> Path:
    """`path` is, or can be created as, a directory this process writes in and can replace (its
    parent is writable too); returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file, and a directory is written there; give a directory path")
    absolute = path.absolute()
    _check_writable(flag, path, _existing_ancestor(absolute.parent), error)
    if path.exists():
        _check_writable(flag, path, absolute, error)
    return path
