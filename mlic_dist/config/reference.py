"""The configuration reference: every key of `mlic_dist.config.Config` with its default and the
docstring under its field. `key_table()` is the README's table (tests/test_config.py checks that
the README holds exactly it):

    python -c "from mlic_dist.config.reference import key_table; print(key_table())"
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import fields

from .schema import Config


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field: the reference table in the README."""
    docs = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = b.value.value
    except (OSError, TypeError):
        pass
    rows = []
    inst = cls()
    for f in fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(getattr(inst, f.name)), docs.get(f.name, "")))
    return rows


def key_table() -> str:
    """The README's configuration table (Markdown), one row per key from `describe()`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in describe()]
    return "\n".join(rows)
