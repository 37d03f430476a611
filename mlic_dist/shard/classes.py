"""The class list: reading `--classes FILE`, the per-class count table, and typo warnings.

When the classes are the names found in the data (a CSV `labels` column, VOC object names) one
misspelt label silently becomes a class of its own ("cat" 300 times, "cta" once). Such a class is
flagged when either
- it is rare: at most RARE_MAX occurrences (positive or ignore, all splits) while the median
  class has at least RARE_RATIO times more, or
- it looks like a much more frequent class: at most RARE_MAX occurrences, and a class with at
  least RARE_RATIO times more has the same name up to case, or a similar one (difflib ratio >=
  SIMILAR_CUTOFF: "cta"/"cat", "persn"/"person").
The warning goes to stderr and into the manifest ("class_warnings"); the fix it names is
`--classes FILE` (names outside the file become "unknown class" rejects) or correcting the labels.
Classes from a fixed list (COCO categories, NUS-WIDE concepts, CSV class columns, --classes) are
not checked: a rare class there is rare, not a typo.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from .records import SourceError

RARE_MAX = 2          # occurrences at or below which a class can be a typo
RARE_RATIO = 50       # ... when the median class (or a look-alike) has this many times more
SIMILAR_CUTOFF = 0.6  # difflib.SequenceMatcher ratio for a look-alike name


def read_classes_file(path) -> list[str]:
    """Class names one per line, in order; blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"--classes {path}: cannot read it ({type(e).__name__}: {e}); pass a text "
                          "file with one class name per line") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise SourceError(f"--classes {path}: no class names in it; list one per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SourceError(f"--classes {path}: {dup} listed more than once; list each class once")
    return names


def occurrences(classes: list[str], label_counts_by_split: dict) -> dict[str, int]:
    """Positive + ignore count of each class over all splits (manifest "label_counts")."""
    return {c: sum(v[c]["positive"] + v[c]["ignore"] for v in label_counts_by_split.values())
            for c in classes}


def typo_warnings(counts: dict[str, int]) -> list[dict]:
    """[{"class", "count", "median", "similar_to", "similar_count", "message"}] for suspect classes."""
    if len(counts) < 2:
        return []
    median = float(np.median(list(counts.values())))
    out = []
    for name, n in counts.items():
        if n > RARE_MAX:
            continue
        floor = RARE_RATIO * max(n, 1)
        frequent = [c for c, m in counts.items() if c != name and m >= floor]
        same_case = [c for c in frequent if c.lower() == name.lower()]
        similar = same_case or difflib.get_close_matches(name, frequent, n=1, cutoff=SIMILAR_CUTOFF)
        if median < floor and not similar:
            continue
        like = similar[0] if similar else None
        msg = (f"class {name!r} occurs {n} time(s) while the median class occurs {median:g} times"
               + (f"; it looks like a typo of {like!r} ({counts[like]})" if like else
                  ": it may be a typo")
               + ". If so, correct the labels, or list the real classes one per line in a file and "
               "re-shard with --classes FILE (labels outside it are rejected as 'unknown class')")
        out.append({"class": name, "count": n, "median": median, "similar_to": like,
                    "similar_count": counts[like] if like else None, "message": msg})
    return out


def count_table(counts: dict[str, int], width: int = 96) -> list[str]:
    """"name N, name N, ..." wrapped to `width` columns, in class order."""
    lines, line = [], ""
    for name, n in counts.items():
        item = f"{name} {n}"
        if line and len(line) + 2 + len(item) > width:
            lines.append(line + ",")
            line = item
        else:
            line = f"{line}, {item}" if line else item
    return lines + ([line] if line else [])
