"""Validate and encode images, write WebDataset tars + DALI indexes, the manifest and the rejects.

Layout of DIR (docs/contracts.md): `{split}-{NNNNNN}.tar` + `.idx` (DALI wds2idx), `{split}-keys.txt`,
`manifest.json`, `rejects.jsonl`. Everything is written into a sibling temporary directory that replaces
DIR only after the manifest is complete (atomic.replace_dir), so an interrupted run never leaves a tar a manifest
claims; an existing DIR is replaced only with `overwrite=True`.

Decoding (to validate) and re-encoding are CPU-bound and run in a process pool (`workers`); results
come back in input order and the main process alone writes, so the bytes on disk do not depend on
the number of workers. Tar members carry a fixed mtime for the same reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..atomic import replace_dir
from ..errors import UserError
from ..images import to_rgb
from .classes import count_table, occurrences, typo_warnings
from .records import SPLITS, Record, Reject, SourceDataset

FORMAT_VERSION = 1
_TAR_MTIME = 1_700_000_000  # fixed member mtime: byte-identical tars across runs and worker counts
_EXIF_ORIENTATION = 0x0112


class ShardError(UserError, RuntimeError):
    """The run cannot produce a valid shard directory; the message says why and what to change."""


@dataclass(frozen=True)
class ShardOptions:
    out: Path
    """Output directory (must not exist unless overwrite)."""
    shard_size_mb: float = 256.0
    """Start a new tar once the current one reaches this many MB (1 MB = 1e6 bytes)."""
    samples_per_shard: int = 0
    """Also start a new tar after this many samples; 0 = no count limit."""
    max_side: int = 0
    """Re-encode images whose longer side exceeds this (resized to it); 0 = keep every size."""
    quality: int = 90
    """JPEG quality for re-encoded images."""
    workers: int = 1
    """Processes decoding/encoding images; output is identical for any value."""
    max_reject_fraction: float = 0.05
    """Fail when rejects / inputs exceeds this (NUS-WIDE with dead URLs needs more)."""
    seed: int = 0
    """Seeds the train-split shuffle (and the val carve, done before the writer)."""
    overwrite: bool = False
    """Replace an existing output directory."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self):
        checks = [("shard_size_mb", self.shard_size_mb > 0, "> 0, e.g. 256"),
                  ("samples_per_shard", self.samples_per_shard >= 0, ">= 0 (0 = no limit)"),
                  ("max_side", self.max_side >= 0, ">= 0 (0 = no limit)"),
                  ("quality", 1 <= self.quality <= 100, "in 1..100, e.g. 90"),
                  ("workers", self.workers >= 1, ">= 1"),
                  ("max_reject_fraction", 0 <= self.max_reject_fraction <= 1, "in [0, 1]")]
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be {fix}")


# --------------------------------------------------------------------------------------------
# image validation / encoding (runs in worker processes: keep it importable without webdataset)

def encode_image(task: tuple) -> tuple:
    """(path, max_side, quality) -> ("ok", jpeg, w, h, reasons) | ("reject", reason, detail).

    The original bytes are kept when the file already is an RGB JPEG with upright EXIF
    orientation within max_side; anything else is fully decoded and re-encoded, and `reasons`
    says why (counted as "converted" in the manifest).
    """
    path, max_side, quality = task
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return ("reject", "unreadable image", str(e))
    if not data:
        return ("reject", "zero-byte image", "file is empty")
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = im.format, im.mode, im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
        reasons = ([f"format {fmt}"] if fmt != "JPEG" else []) + \
                  ([f"mode {mode}"] if mode != "RGB" else []) + \
                  (["exif orientation"] if orientation not in (0, 1) else [])
        scale = max_side / max(w, h) if max_side and max(w, h) > max_side else 1.0
        if scale < 1.0:
            reasons.append("resized")
            if fmt == "JPEG" and not reasons[:-1]:
                # DCT-domain downscale while decoding: much faster, still reads the whole stream
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()  # full decode: catches truncated and corrupt files
    except Image.UnidentifiedImageError:  # its message holds a memory address: not reproducible
        return ("reject", "corrupt image", "not a recognised image format")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        return ("reject", "corrupt image", f"{type(e).__name__}: {e}"[:300])
    if not reasons:
        return ("ok", data, w, h, [])
    try:
        im = to_rgb(im)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if orientation in (5, 6, 7, 8):  # transposed above: w/h swapped
                size = size[::-1]
            im = im.resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    except Exception as e:
        return ("reject", "unconvertible image", f"{type(e).__name__}: {e}"[:300])
    return ("ok", buf.getvalue(), im.width, im.height, reasons)


def _ping(_) -> None:
    time.sleep(0.05)  # long enough that every worker takes one: all have imported after map()


def _start_pool(workers: int):
    """A warm process pool (None for workers=1), started before the throughput clock."""
    if workers <= 1:
        return None
    # spawn: the parent may hold DALI/torch threads, which fork would copy in a broken state
    pool = mp.get_context("spawn").Pool(workers)
    pool.map(_ping, range(workers), chunksize=1)
    return pool


# --------------------------------------------------------------------------------------------
# tar writing

def make_index(tar: Path, idx: Path) -> None:
    """DALI's own wds2idx (shipped in the nvidia-dali wheel), never a hand-rolled format."""
    try:
        from wds2idx import IndexCreator
    except ImportError as e:
        raise ShardError("the DALI wds2idx tool is not importable; install nvidia-dali-cuda130 "
                         f"(it ships wds2idx.py): {e}") from None
    with IndexCreator(str(tar), str(idx), verbose=False) as creator:
        creator.create_index()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _SplitWriter:
    """Rolls `{split}-NNNNNN.tar` files by size and count; indexes and hashes each on close."""

    def __init__(self, tmp: Path, split: str, opts: ShardOptions):
        self.tmp, self.split, self.opts = tmp, split, opts
        self.max_bytes = opts.shard_size_mb * 1e6
        self.max_count = opts.samples_per_shard or sys.maxsize
        self.shards: list[dict] = []
        self.keys: list[str] = []
        self._file = self._tar = None
        self._count = 0

    def write(self, key: str, jpeg: bytes, labels: np.ndarray, meta: dict) -> None:
        if self._tar is not None and (self._count >= self.max_count
                                      or self._file.tell() >= self.max_bytes):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        sample_id = len(self.keys)
        self._tar.write({
            "__key__": key,
            "jpg": jpeg,
            "lbl": labels.astype(np.int8).tobytes(),                 # (C,) int8
            "id": np.array([sample_id], dtype="<i8").tobytes(),      # int64 LE ordinal
            "json": json.dumps(meta, sort_keys=True).encode(),
        })
        self.keys.append(key)
        self._count += 1

    def _open_shard(self):
        import webdataset as wds  # heavy import (torch): main process only

        self._name = f"{self.split}-{len(self.shards):06d}"
        self._file = open(self.tmp / f"{self._name}.tar", "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
        self._count = 0

    def _close_shard(self):
        self._tar.close()
        self._file.close()
        tar, idx = self.tmp / f"{self._name}.tar", self.tmp / f"{self._name}.idx"
        make_index(tar, idx)
        # "bytes": read_manifest compares it with the size on disk (a cheap truncation check)
        self.shards.append({"file": tar.name, "index": idx.name, "num_samples": self._count,
                            "bytes": tar.stat().st_size, "sha256": _sha256(tar)})
        self._tar = self._file = None

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()
        (self.tmp / f"{self.split}-keys.txt").write_text("".join(k + "\n" for k in self.keys))


# --------------------------------------------------------------------------------------------
# the run

def _reject_summary(rejects: list[Reject]) -> dict:
    return dict(Counter(r.reason for r in rejects).most_common())


def check_rejects(rejects: list[Reject], num_inputs: int, opts: ShardOptions, final: bool):
    """ShardError (reasons, the first few, OUT.rejects.jsonl written) when too many were rejected.
    `shard()` calls it before the val carve too, so rejecting everything names the real cause."""
    allowed = math.floor(opts.max_reject_fraction * num_inputs)
    if len(rejects) <= allowed:
        return
    where = opts.out.with_name(opts.out.name + ".rejects.jsonl")
    _write_rejects(where, rejects)
    examples = "\n".join(f"  {r.key} ({r.source}): {r.reason}" + (f" - {r.detail}" if r.detail
                                                                    else "") for r in rejects[:5])
    raise ShardError(
        f"{len(rejects)} of {num_inputs} inputs rejected ({len(rejects) / max(num_inputs, 1):.1%}) "
        f"{'' if final else '(stopped early) '}> --max-reject-fraction={opts.max_reject_fraction}. "
        f"By reason: {_reject_summary(rejects)}. First ones:\n{examples}\nAll rejects: {where}\n"
        "Fix the inputs, or raise --max-reject-fraction if they are expected (NUS-WIDE: many "
        "Flickr URLs are dead, so 'missing image' rejects are normal; --keep-empty keeps "
        "images without labels).")


def _write_rejects(path: Path, rejects: list[Reject]) -> None:
    with open(path, "w") as f:
        for r in rejects:
            f.write(json.dumps({"key": r.key, "source": r.source, "reason": r.reason,
                                "split": r.split, "detail": r.detail}) + "\n")


def _label_counts(classes: list[str], labels: np.ndarray) -> dict:
    return {c: {"positive": int((labels[:, i] == 1).sum()), "ignore": int((labels[:, i] == -1).sum())}
            for i, c in enumerate(classes)}


def order_records(records: list[Record], split: str, seed: int) -> list[Record]:
    """Train is shuffled (seeded) because DALI only shuffles inside a small buffer."""
    if split != "train":
        return records
    perm = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in perm]


def write_shards(ds: SourceDataset, opts: ShardOptions, args: dict,
                 carved: Optional[dict] = None) -> dict:
    """Encode, validate and write `ds` to opts.out; return the manifest (also on disk)."""
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise ShardError(f"output directory {out} already exists; pass --overwrite to replace it "
                         "or choose another --out")
    check_rejects(ds.rejects, ds.num_inputs, opts, final=False)
    # incl. KeyboardInterrupt: replace_dir leaves nothing half-written behind
    with replace_dir(out) as tmp:
        manifest = _write_all(ds, opts, args, carved, tmp)
        if out.exists() and not opts.overwrite:  # re-checked: another run may have finished meanwhile
            raise ShardError(f"output directory {out} appeared during the run; pass --overwrite")
    out.with_name(out.name + ".rejects.jsonl").unlink(missing_ok=True)  # a failed run's list
    return manifest


def _write_all(ds: SourceDataset, opts: ShardOptions, args: dict, carved, tmp: Path) -> dict:
    import webdataset  # noqa: F401  (seconds: torch) import before the clock starts

    rejects = list(ds.rejects)
    by_split = {s: order_records([r for r in ds.records if r.split == s], s, opts.seed)
                for s in SPLITS}
    order = [r for s in SPLITS for r in by_split[s]]
    tasks = [(str(r.image), opts.max_side, opts.quality) for r in order]
    writers = {s: _SplitWriter(tmp, s, opts) for s in SPLITS if by_split[s]}
    kept_labels = {s: [] for s in SPLITS}
    converted = Counter()
    n_converted = 0
    t_pool = time.perf_counter()
    pool = _start_pool(opts.workers)
    t0 = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="img", desc="shard", disable=not opts.progress,
               file=sys.stderr)
    # results come back in task order, so the written bytes do not depend on `workers`
    results = pool.imap(encode_image, tasks, chunksize=8) if pool else map(encode_image, tasks)
    try:
        for rec, res in zip(order, results):
            bar.update(1)
            if res[0] == "reject":
                rejects.append(Reject(rec.key, rec.source, res[1], rec.split, res[2]))
                check_rejects(rejects, ds.num_inputs, opts, final=False)  # fail fast
                continue
            _, jpeg, w, h, reasons = res
            if reasons:
                n_converted += 1
                converted.update(reasons)
            meta = {"labels": [ds.classes[i] for i in np.flatnonzero(rec.labels == 1)],
                    "ignored": [ds.classes[i] for i in np.flatnonzero(rec.labels == -1)],
                    "source": rec.source, "width": w, "height": h}
            writers[rec.split].write(rec.key, jpeg, rec.labels, meta)
            kept_labels[rec.split].append(rec.labels)
    finally:
        if pool is not None:  # stop the workers now, also on errors and Ctrl-C
            pool.terminate()
            pool.join()
        bar.close()
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - t0
    check_rejects(rejects, ds.num_inputs, opts, final=True)
    for s in ("train", "val"):  # the trainer cannot run without them; test may be absent
        if not kept_labels[s]:
            raise ShardError(f"split {s!r} has no samples after rejects (inputs per split: "
                             f"{ {k: len(v) for k, v in by_split.items()} }); fix the inputs")

    splits = {}
    for s, w in writers.items():
        if not w.keys:
            continue
        labels = np.stack(kept_labels[s])
        splits[s] = {"num_samples": len(w.keys), "shards": w.shards, "keys_file": f"{s}-keys.txt",
                     "label_counts": _label_counts(ds.classes, labels)}
    _write_rejects(tmp / "rejects.jsonl", rejects)
    n_written = sum(v["num_samples"] for v in splits.values())
    counts = occurrences(ds.classes, {s: v["label_counts"] for s, v in splits.items()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": ds.kind,
        "classes": ds.classes,
        "classes_from": ds.classes_from,
        # a class from the data's own names that is rare enough to be a typo (classes.py)
        "class_warnings": typo_warnings(counts) if ds.classes_from == "data" else [],
        "source_notes": ds.notes,
        "splits": splits,
        "args": args,
        "rejects": {"count": len(rejects), "by_reason": _reject_summary(rejects),
                    "file": "rejects.jsonl"},
        "num_inputs": ds.num_inputs,
        "converted": {"count": n_converted, "by_reason": dict(converted.most_common())},
        "val_carved": carved,
        "stats": {"images": len(tasks), "written": n_written, "seconds": round(seconds, 3),
                  "images_per_s": round(len(tasks) / max(seconds, 1e-9), 1),
                  "pool_start_s": round(t0 - t_pool, 3),  # not in images_per_s
                  "workers": opts.workers,
                  "bytes": sum(sh["bytes"] for v in splits.values() for sh in v["shards"])},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def summary(manifest: dict, out: Path) -> str:
    """Human-readable end-of-run report (the CLI prints it)."""
    lines = [f"wrote {out}  ({manifest['kind']}, {len(manifest['classes'])} classes)"]
    for s, v in manifest["splits"].items():
        lines.append(f"  {s:5s}: {v['num_samples']:>8d} samples in {len(v['shards'])} shard(s)")
    positives = {c: sum(v["label_counts"][c]["positive"] for v in manifest["splits"].values())
                 for c in manifest["classes"]}
    lines.append("  classes (positives, all splits):")
    lines += [f"    {ln}" for ln in count_table(positives)]
    lines += [f"  note: {n}" for n in manifest.get("source_notes", [])]
    rj = manifest["rejects"]
    lines.append(f"  inputs: {manifest['num_inputs']}, rejected: {rj['count']} {rj['by_reason']}"
                 + (f" -> {out / rj['file']}" if rj["count"] else ""))
    cv = manifest["converted"]
    lines.append(f"  re-encoded: {cv['count']} {cv['by_reason']}")
    if manifest.get("val_carved"):
        c = manifest["val_carved"]
        none = c["classes_without_val_positive"]
        lines.append(f"  val carved from train: {c['val_samples']} of "
                     f"{c['train_samples'] + c['val_samples']} (fraction {c['fraction']}, seed "
                     f"{c['seed']}); max |positive-rate diff| {c['max_abs_rate_diff']} "
                     f"({c['max_abs_rate_diff_class']})"
                     + (f"; {len(none)} class(es) without a val positive: {none[:10]}"
                        + (" ..." if len(none) > 10 else "") if none else ""))
    lines += [f"  warning: {w['message']}" for w in manifest.get("class_warnings", [])]
    st = manifest["stats"]
    lines.append(f"  {st['images']} images in {st['seconds']:.1f} s = {st['images_per_s']:.1f} "
                 f"images/s with {st['workers']} worker(s), {st['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def options_dict(opts: ShardOptions) -> dict:
    d = asdict(opts)
    d["out"] = str(d["out"])
    return d
