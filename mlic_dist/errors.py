"""The kinds of failure a user must be able to tell apart; every entry point reports them the
same way (mlic_dist/cli.py, docs/contracts.md "Errors").

`UserError`: bad input (a config value, a missing or unwritable path, an unknown backbone, a
damaged shard: `ShardDataError`). Every CLI prints its message as one line, `error: ...`, and
exits with status 2, with no traceback; the message names the key, file or value at fault and the
fix. Each module's own error class (ConfigError, EnsembleError, ...) derives from it.
`RunFailure`: the work itself failed on good input; one line, exit status 1:
  `DivergenceError`: non-finite losses; the message names the epoch, the step and the last good
  checkpoint.
  `ExportCheckError`: an exported model file does not compute what the trained model computes;
  `mlic_dist.export` removes the file (logs nothing).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input; the message says what was wrong, the value received and the fix."""


class ShardDataError(UserError, RuntimeError):
    """A shard file is truncated, inconsistent or holds a sample that cannot be read or decoded.

    The message is one line: the file, the sample key where known, what is wrong and the fix."""


class RunFailure(RuntimeError):
    """The work failed on valid input; the message says where and what to do (exit status 1)."""


class DivergenceError(RunFailure):
    """The loss or the gradients stayed non-finite; the message says where and what to do."""


class ExportCheckError(RunFailure):
    """The written model's outputs differ from the in-memory model's beyond the tolerance."""
