"""Check a shard directory end to end, and name every bad file and sample.

    python -m mlic_dist.shard verify shards/voc2007                  # files, sizes, hashes, indexes, labels
    python -m mlic_dist.shard verify shards/voc2007 --decode         # ... and decode every image
    python -m mlic_dist.shard verify shards/coco2014 --split val --decode --workers 4

Exit status 0 when everything is clean, 1 when anything is bad (each problem printed on its own
line: file, sample key, what is wrong), 2 for a user error (no such directory, not a shard
directory, unknown split). What is checked, per split (docs/contracts.md "Shards"):
- every shard listed in manifest.json exists with the recorded byte size and sha256;
- its wds2idx index exists, declares the shard's sample count and agrees with the tar's members;
- every sample has .jpg .lbl .id .json; ids run 0..N-1 in written order; the key of id i is line i
  of `{split}-keys.txt`; .lbl holds one -1/0/1 byte per class; .json's labels match .lbl;
- the split's sample count and per-class label counts equal the manifest's; keys are unique;
- with --decode, every image decodes with the loaders' strict CPU decoder (integrity.py).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.integrity import ShardDataError, index_mismatch, iter_samples, read_index, sample_problem, tar_members
from ..errors import UserError


class VerifyUsageError(UserError, ValueError):
    """The command cannot run as asked (no such directory, unknown split): exit status 2."""


@dataclass(frozen=True)
class Finding:
    where: str     # a file name inside DIR
    key: str       # the sample key, "" for a whole-file problem
    what: str

    def line(self) -> str:
        return f"{self.where}: " + (f"sample {self.key!r} " if self.key else "") + self.what


@dataclass
class Report:
    root: Path
    decode: bool
    findings: list[Finding] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def text(self) -> str:
        head = (f"verify {self.root}: {', '.join(self.splits) or 'no splits'}; {self.shards} shard(s), "
                f"{self.samples} sample(s) read" + (", every image test-decoded" if self.decode else
                                                    " (images not decoded: add --decode)"))
        if self.ok:
            return f"{head}\nclean"
        bad_files = len({f.where for f in self.findings})
        return "\n".join([head] + [f"  {f.line()}" for f in self.findings] + [
            f"{len(self.findings)} problem(s) in {bad_files} file(s). Restore them from a good copy or "
            "re-run `python -m mlic_dist.shard` for the dataset"])


def verify(root, decode: bool = False, splits: Optional[list[str]] = None, workers: int = 1) -> Report:
    """Check the shard directory `root` (see the module docstring); never raises for bad data."""
    root = Path(root)
    if not root.is_dir():
        raise VerifyUsageError(f"{root} is not a directory; pass the --out directory of "
                               "`python -m mlic_dist.shard`")
    if not (root / "manifest.json").is_file():
        raise VerifyUsageError(f"{root} has no manifest.json, so it is not a shard directory; pass the "
                               "--out directory of `python -m mlic_dist.shard`")
    if workers < 1:
        raise VerifyUsageError(f"--workers={workers} must be >= 1")
    report = Report(root, decode)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        classes = list(manifest["classes"])
        all_splits = dict(manifest["splits"])
    except (ValueError, KeyError, TypeError) as e:
        report.findings.append(Finding("manifest.json", "", f"is not a valid manifest ({e!r})"))
        return report
    unknown = [s for s in splits or [] if s not in all_splits]
    if unknown:
        raise VerifyUsageError(f"--split {unknown[0]!r} is not in {root / 'manifest.json'}; it has "
                               f"{sorted(all_splits)}")
    report.splits = list(splits or all_splits)
    keys_seen: dict[str, str] = {}
    for split in report.splits:
        _verify_split(report, split, all_splits[split], classes, keys_seen, decode, workers)
    return report


def _verify_split(report: Report, split: str, info: dict, classes: list[str], keys_seen: dict,
                  decode: bool, workers: int) -> None:
    root, add = report.root, report.findings.append
    n = int(info.get("num_samples", -1))
    keys_file = info.get("keys_file", f"{split}-keys.txt")
    try:
        keys = (root / keys_file).read_text().splitlines()
    except OSError as e:
        add(Finding(keys_file, "", f"cannot be read ({e.strerror or e})"))
        keys = []
    if keys and len(keys) != n:
        add(Finding(keys_file, "", f"lists {len(keys)} keys, the manifest says split {split!r} has {n}"))
    for k in keys:
        if k in keys_seen:
            add(Finding(keys_file, k, f"is listed twice (also in {keys_seen[k]})"))
        keys_seen[k] = keys_file
    jobs, first = [], 0
    for entry in info.get("shards", []):
        count = int(entry.get("num_samples", 0))
        jobs.append((str(root), entry, first, classes, keys[first:first + count], decode))
        first += count
    if first != n:
        add(Finding("manifest.json", "", f"split {split!r} says num_samples={n}, its shards hold {first}"))
    before = len(report.findings)
    positive, ignore = np.zeros(len(classes), np.int64), np.zeros(len(classes), np.int64)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(check_shard, jobs) if pool else map(check_shard, jobs)
        for findings, seen, pos, ign in results:
            report.findings += findings
            report.shards += 1
            report.samples += seen
            positive += pos
            ignore += ign
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    counts = {c: {"positive": int(p), "ignore": int(g)} for c, p, g in zip(classes, positive, ignore)}
    recorded = info.get("label_counts")
    if len(report.findings) == before and recorded is not None and recorded != counts:  # else: noise
        diff = [c for c in classes if recorded.get(c) != counts[c]]
        add(Finding("manifest.json", "", f"label_counts of split {split!r} differ from the shards for "
                    f"{len(diff)} class(es), e.g. {diff[0]!r}: manifest {recorded.get(diff[0])}, shards "
                    f"{counts[diff[0]]}"))


def check_shard(job: tuple) -> tuple[list[Finding], int, np.ndarray, np.ndarray]:
    """One shard (runs in a worker process with --workers): (findings, samples read,
    positive and ignore counts per class)."""

    root, entry, first_id, classes, keys, decode = job
    C = len(classes)
    pos, ign = np.zeros(C, np.int64), np.zeros(C, np.int64)
    name, idx_name = entry.get("file", "?"), entry.get("index", "?")
    tar, idx = Path(root) / name, Path(root) / idx_name
    n = int(entry.get("num_samples", 0))
    out: list[Finding] = []
    if not tar.is_file():
        return [Finding(name, "", "is missing")], 0, pos, ign
    entries = None
    try:
        if not idx.is_file():
            out.append(Finding(idx_name, "", "is missing"))
        else:
            declared, entries = read_index(idx)
            if declared != n:
                out.append(Finding(idx_name, "", f"declares {declared} samples, the manifest {n}"))
    except ShardDataError as e:
        out.append(Finding(idx_name, "", str(e)))
    size, recorded = tar.stat().st_size, entry.get("bytes")
    extent = max((o + k for _, comps in entries or [] for o, k in comps.values()), default=0)
    truncated = size < (int(recorded) if recorded is not None else extent)
    if recorded is not None and size != int(recorded):
        how = "truncated" if size < int(recorded) else "changed since it was written"
        out.append(Finding(name, "", f"is {size} bytes, the manifest recorded {recorded}: {how}"))
    elif recorded is None and size < extent:
        out.append(Finding(name, "", f"is {size} bytes, its index places data up to byte {extent}: "
                           "truncated"))
    else:
        with open(tar, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if entry.get("sha256") and digest != entry["sha256"]:
            out.append(Finding(name, "", "has a sha256 other than the manifest's: its bytes changed "
                               "since it was written (--decode names the samples that no longer decode)"))
    try:
        # a truncated tar disagrees with its index by definition: say it once
        mismatch = entries is not None and not truncated and index_mismatch(entries, tar_members(tar))
        if mismatch:
            out.append(Finding(idx_name, "", f"disagrees with {name}: {mismatch}"))
    except (tarfile.TarError, OSError, EOFError):
        pass   # a broken tar header: reported once, by the sample scan below
    seen = 0
    try:
        for seen, (key, comps) in enumerate(_samples(tar, decode), start=1):
            pos_i = first_id + seen - 1
            what = sample_problem(comps, pos_i, decode) or _labels_problem(comps, C, classes)
            if not what and seen <= len(keys) and keys[seen - 1] != key:
                what = f"is id {pos_i}, but line {pos_i + 1} of the keys file says {keys[seen - 1]!r}"
            if what:
                out.append(Finding(name, key, what))
            if comps.get("lbl") is not None and len(comps["lbl"]) == C:
                lbl = np.frombuffer(comps["lbl"], np.int8)
                pos += lbl == 1
                ign += lbl == -1
    except ShardDataError as e:
        out.append(Finding(name, "", str(e).split(": ", 1)[-1]))
    if seen != n:
        out.append(Finding(name, "", f"holds {seen} samples, the manifest says {n}"))
    return out, seen, pos, ign


def _samples(tar: Path, decode: bool):
    return iter_samples(tar, read=None if decode else ("lbl", "id", "json"))


def _labels_problem(comps: dict, C: int, classes: list[str]) -> Optional[str]:
    lbl = np.frombuffer(comps["lbl"], np.int8)
    if lbl.shape != (C,):
        return f"has {lbl.size} label bytes, the manifest lists {C} classes"
    if not np.isin(lbl, (-1, 0, 1)).all():
        return f"has label values {sorted(set(lbl.tolist()) - {-1, 0, 1})} (allowed: -1, 0, 1)"
    if "json" not in comps:
        return "lacks .json"
    try:
        meta = json.loads(comps["json"])
        want = ([classes[i] for i in np.flatnonzero(lbl == 1)], [classes[i] for i in np.flatnonzero(lbl == -1)])
        if (meta.get("labels"), meta.get("ignored")) != want:
            return f".json labels {meta.get('labels')} / ignored {meta.get('ignored')} differ from .lbl {want}"
    except (ValueError, AttributeError) as e:
        return f"has a .json that does not parse ({e})"
    return None
