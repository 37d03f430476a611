"""Writing outputs: check a destination before the work, replace it atomically after.

One rule for every file this package replaces (run directories, checkpoints, reports, exports,
sweep state): the new content goes to a temporary sibling `.NAME.tmp-PID-RANDOM[SUFFIX]` in the same
directory (same filesystem, so the rename is atomic; pid and random part keep two writers' temporaries
apart; the suffix keeps writers that pick a format by extension working), is flushed and fsynced,
then `os.replace`d over the target, and the directory is fsynced; on any failure the temporary
is removed and the target is untouched. A reader therefore sees the old file or the new one,
never a part, even after `kill -9` or a power loss.

    with replace_with(path) as tmp:     # any writer that takes a path: np.save, fig.savefig, onnx ...
        np.save(tmp, array)
    write_bytes(path, data); write_text(path, text)
    with replace_dir(out) as tmp:       # a whole directory, swapped in at once
        ...
    publish_dir(tmp, final)             # a directory several processes filled (a checkpoint)

Checking a destination BEFORE the work (`check_file`, `check_dir`): a bad `--out` is one line
naming the path and the fix at the start, not a traceback after minutes of predicting, fusing or
exporting. A destination is good when it is not the wrong kind (a directory where a file is
wanted, a file where a directory is), and the nearest part of it that exists is a directory this
process can create files in (probed with a real temporary file: permission bits do not tell root
about /proc or a read-only mount). Nothing is created. Each check raises the caller's own
user-error class, so its CLI prints one line and exits 2.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def _tmp_sibling(path: Path, keep_suffix: bool = True) -> Path:
    # pid + random: writers in two containers (both pid 1) or on two hosts sharing a mount differ too
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.tmp-{unique}" + (path.suffix if keep_suffix else ""))


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)   # fsync needs no write access on Linux
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_with(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it replaces `path` (fsynced
    first); on failure it is removed and `path` is untouched. The parent is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replace_with(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


@contextlib.contextmanager
def replace_dir(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; on success it takes `path`'s place
    whole (a previous `path` is removed only after the swap, and put back if the swap fails
    half-way); on failure it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, keep_suffix=False)
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:   # on success tmp is gone already; on a failure neither half-written copy stays
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():   # the swap failed half-way: the previous one back
            os.rename(old, path)
        shutil.rmtree(old, ignore_errors=True)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename a fully written directory `tmp` (its files fsynced by their writers, possibly
    several processes) to `final`, replacing a previous `final`; both renames made durable."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


# --------------------------------------------------------------------------- destinations


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
