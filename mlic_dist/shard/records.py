"""The shared data model of the dataset readers, and the rules every format obeys.

A reader (mlic_dist/shard/sources.py) yields `Item`s (a labelled image) or `Reject`s (an
annotation that cannot become a sample); `collect` applies the format-independent rules in input
order, so keys are deterministic: keys are dot-free (webdataset splits a tar member name at its
first dot) and unique, a repeated input is a "duplicate key" reject, a missing image file a
"missing image" one, an image without any label a "no labels" one (unless keep_empty). The writer
(mlic_dist/shard/writer.py) turns the resulting `SourceDataset` into shards.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ..errors import UserError

SPLITS = ("train", "val", "test")
_MAX_KEY_LEN = 80  # USTAR tar names hold 100 chars; leave room for ".json"
CLASSES_FROM = ("data", "file", "dataset")  # names found in the labels | --classes | the format's list


class SourceError(UserError, ValueError):
    """An input file is malformed or missing; the message names the file, line and the fix."""


@dataclass
class Item:
    raw_key: str        # identity in the input (duplicates of it are rejected)
    image: Path         # absolute image path
    source: str         # image path relative to ROOT (stored in KEY.json)
    labels: np.ndarray  # (C,) int8: 1 positive, 0 negative, -1 ignore
    split: str


@dataclass
class Reject:
    key: str
    source: str
    reason: str         # a short fixed category, counted in the manifest
    split: str = ""
    detail: str = ""


@dataclass
class Record:
    key: str            # sanitised, dot-free, unique in the dataset
    image: Path
    source: str
    labels: np.ndarray  # (C,) int8
    split: str


@dataclass
class SourceDataset:
    kind: str
    root: Path
    classes: list[str]
    records: list[Record]
    rejects: list[Reject]
    num_inputs: int                      # records + rejects: every annotation entry seen
    splits_present: list[str] = field(default_factory=list)
    classes_from: str = "dataset"        # one of CLASSES_FROM: "data" lists get typo checks
    notes: list[str] = field(default_factory=list)   # what the reader decided (manifest, summary)


def sanitize_key(raw: str) -> str:
    """Map an identifier to [A-Za-z0-9_-]: webdataset splits a tar name at its first dot."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "sample"
    if len(key) > _MAX_KEY_LEN:
        key = key[:_MAX_KEY_LEN - 13] + "-" + hashlib.sha1(raw.encode()).hexdigest()[:12]
    return key


def collect(kind: str, root: Path, classes: list[str], entries: Iterable[Union[Item, Reject]],
            keep_empty: bool, classes_from: str = "dataset", notes: Optional[list] = None) -> SourceDataset:
    """Apply the format-independent rules, in input order, so keys are deterministic."""
    records, rejects = [], []
    seen_raw: set[str] = set()
    used: set[str] = set()
    splits = []
    for e in entries:
        if e.split and e.split not in splits:
            splits.append(e.split)
        if isinstance(e, Reject):  # reject keys are sanitised too: one naming everywhere
            rejects.append(Reject(sanitize_key(e.key), e.source, e.reason, e.split, e.detail))
            continue
        rkey = sanitize_key(e.raw_key)
        if e.raw_key in seen_raw:
            rejects.append(Reject(rkey, e.source, "duplicate key", e.split,
                                  f"{e.raw_key!r} appears more than once in the input"))
            continue
        seen_raw.add(e.raw_key)
        if not e.image.is_file():
            rejects.append(Reject(rkey, e.source, "missing image", e.split, str(e.image)))
            continue
        if not keep_empty and not np.any(e.labels != 0):
            rejects.append(Reject(rkey, e.source, "no labels", e.split,
                                  "no positive or ignore label (use --keep-empty to keep)"))
            continue
        key = rkey
        if key in used:  # two distinct inputs sanitise alike ("a.b" / "a_b"): suffix, stay unique
            n = 1
            while f"{key}-{n}" in used:
                n += 1
            key = f"{key}-{n}"
        used.add(key)
        records.append(Record(key, e.image, e.source, e.labels.astype(np.int8), e.split))
    splits = [s for s in SPLITS if s in splits]
    return SourceDataset(kind, root, list(classes), records, rejects,
                         len(records) + len(rejects), splits, classes_from, list(notes or []))
