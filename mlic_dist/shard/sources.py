"""Dataset readers: one function per on-disk format, all producing the same `SourceDataset`.

Each reader yields `Item`s (a labelled image) or `Reject`s (an annotation that cannot become a
sample: unknown class, missing annotation); `collect` then applies the rules every format shares
(dot-free unique keys, duplicate keys, missing image files, empty label sets). Images are not opened
here: decoding is the writer's job, in worker processes.

Accepted layouts (ROOT is the positional argument of `python -m mlic_dist.shard KIND ROOT`):
- voc:     ROOT/Annotations/ID.xml, ROOT/JPEGImages/ID.jpg, ROOT/ImageSets/Main/{train,val,test}.txt
           (or trainval.txt instead of train+val). A class seen only on "difficult" objects is -1.
- coco:    one instances_*.json per split (`--split train=ANN.json`); images in ROOT/<name> for
           instances_<name>.json unless `--images-dir split=DIR`. Classes = categories by id.
- nuswide: ROOT/ImageList/{Train,Test}Imagelist.txt (Windows `\\` separators accepted),
           ROOT/ConceptsList/Concepts81.txt (or ROOT/Concepts81.txt),
           ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt (one 0/1 a line,
           aligned with the image list), images in ROOT/Flickr/<list entry> (or `--images-dir`).
- csv:     a path column (`--path-column`, else the first of image/path/filename) relative to
           `--images`, then either a `labels` column (class names joined by `|`; classes = sorted
           union of names, or `--classes FILE`) or one column per class holding 1/0/-1; an optional
           `split` column (train/val/test; without it every row is train). An optional `key`
           column overrides the key derived from the path.
Unknown class names are *rejects* (counted, reason "unknown class"), not errors, so one typo does
not kill a long run; many of them trip --max-reject-fraction. Malformed files are errors that name
the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

SPLITS = ("train", "val", "test")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
_MAX_KEY_LEN = 80  # USTAR tar names hold 100 chars; leave room for ".json"


class SourceError(ValueError):
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


# --------------------------------------------------------------------------------------------
# shared rules

def sanitize_key(raw: str) -> str:
    """Map an identifier to [A-Za-z0-9_-]: webdataset splits a tar name at its first dot."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "sample"
    if len(key) > _MAX_KEY_LEN:
        key = key[:_MAX_KEY_LEN - 13] + "-" + hashlib.sha1(raw.encode()).hexdigest()[:12]
    return key


def collect(kind: str, root: Path, classes: list[str], entries: Iterable[Union[Item, Reject]],
            keep_empty: bool) -> SourceDataset:
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
                         len(records) + len(rejects), splits)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]


def _split_map(spec: Optional[dict], what: str) -> dict:
    spec = dict(spec or {})
    bad = [k for k in spec if k not in SPLITS and k != "all"]
    if bad:
        raise SourceError(f"{what}: unknown split name(s) {bad}; use train, val or test")
    return spec


# --------------------------------------------------------------------------------------------
# VOC

def read_voc(root: Path, keep_empty: bool = False, **_) -> SourceDataset:
    main = root / "ImageSets" / "Main"
    lists = {s: main / f"{s}.txt" for s in ("train", "val", "test", "trainval")}
    if lists["train"].is_file() and lists["val"].is_file():
        use = {"train": lists["train"], "val": lists["val"]}
    elif lists["trainval"].is_file():
        use = {"train": lists["trainval"]}  # val is carved from it later (stratified)
    elif lists["train"].is_file():
        use = {"train": lists["train"]}
    else:
        raise SourceError(f"{main}: need train.txt + val.txt or trainval.txt (VOC layout: "
                          "ROOT/ImageSets/Main, ROOT/Annotations, ROOT/JPEGImages)")
    if lists["test"].is_file():
        use["test"] = lists["test"]
    index = {c: i for i, c in enumerate(VOC_CLASSES)}

    def entries():
        for split, lst in use.items():
            for ln in _read_lines(lst):
                if not ln:
                    continue
                img_id = ln.split()[0]
                yield _voc_item(root, img_id, split, index)

    return collect("voc", root, list(VOC_CLASSES), entries(), keep_empty)


def _voc_item(root: Path, img_id: str, split: str, index: dict) -> Union[Item, Reject]:
    xml_path = root / "Annotations" / f"{img_id}.xml"
    image = root / "JPEGImages" / f"{img_id}.jpg"
    source = _rel(image, root)
    if not xml_path.is_file():
        return Reject(img_id, source, "missing annotation", split, str(xml_path))
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        line, col = e.position
        raise SourceError(f"{xml_path}:{line}:{col}: malformed XML ({e}); fix or remove the file "
                          f"and its id from ImageSets/Main/{split}.txt") from None
    labels = np.zeros(len(index), np.int8)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            return Reject(img_id, source, "unknown class", split, f"{xml_path}: object name {name!r}")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        c = index[name]
        if not difficult:
            labels[c] = 1
        elif labels[c] == 0:
            labels[c] = -1  # only difficult instances so far: "ignore"
    return Item(img_id, image, source, labels, split)


# --------------------------------------------------------------------------------------------
# COCO

def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None


def read_coco(root: Path, splits: Optional[dict] = None, images_dir: Optional[dict] = None,
              keep_empty: bool = False, **_) -> SourceDataset:
    splits = _split_map(splits, "--split")
    images_dir = _split_map(images_dir, "--images-dir")
    if not splits:
        raise SourceError("coco needs at least one --split NAME=ANNOTATIONS.json "
                          "(e.g. --split train=annotations/instances_train2014.json)")
    loaded, classes, cat_ids = {}, None, None
    for split, ann in splits.items():
        ann = Path(ann) if Path(ann).is_absolute() else root / ann
        data = _load_json(ann)
        for k in ("images", "annotations", "categories"):
            if not isinstance(data.get(k), list):
                raise SourceError(f"{ann}: missing list {k!r}; expected a COCO instances file")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        ids, names = [c["id"] for c in cats], [c["name"] for c in cats]
        if classes is None:
            classes, cat_ids = names, ids
        elif (names, ids) != (classes, cat_ids):
            raise SourceError(f"{ann}: categories differ from the first split's; all splits must "
                              "share one category list")
        loaded[split] = (ann, data)
    col = {cid: i for i, cid in enumerate(cat_ids)}

    def entries():
        for split in (s for s in SPLITS if s in loaded):
            ann, data = loaded[split]
            img_dir = images_dir.get(split) or images_dir.get("all")
            if img_dir is None:
                m = re.match(r"instances_(.+)\.json$", ann.name)
                if not m:
                    raise SourceError(f"{ann}: cannot infer the image folder from this name; pass "
                                      f"--images-dir {split}=DIR")
                img_dir = root / m.group(1)
            img_dir = Path(img_dir) if Path(img_dir).is_absolute() else root / img_dir
            labels = {}
            for i, a in enumerate(data["annotations"]):
                try:
                    row = labels.setdefault(a["image_id"], np.zeros(len(classes), np.int8))
                    row[col[a["category_id"]]] = 1
                except (KeyError, TypeError):
                    raise SourceError(f"{ann}: annotations[{i}] = {str(a)[:120]} lacks image_id "
                                      "or has a category_id not in 'categories'") from None
            for im in data["images"]:
                try:
                    image = img_dir / im["file_name"]
                except (KeyError, TypeError):
                    raise SourceError(f"{ann}: image entry {str(im)[:120]} lacks file_name") from None
                lab = labels.get(im.get("id"), np.zeros(len(classes), np.int8))
                yield Item(Path(im["file_name"]).stem, image, _rel(image, root), lab, split)

    return collect("coco", root, classes, entries(), keep_empty)


# --------------------------------------------------------------------------------------------
# NUS-WIDE

def read_nuswide(root: Path, images_dir: Optional[dict] = None, keep_empty: bool = False,
                 **_) -> SourceDataset:
    images_dir = _split_map(images_dir, "--images-dir")
    concepts_file = next((p for p in (root / "ConceptsList" / "Concepts81.txt",
                                      root / "Concepts81.txt") if p.is_file()), None)
    if concepts_file is None:
        raise SourceError(f"{root}: Concepts81.txt not found in ROOT/ConceptsList/ or ROOT/")
    classes = [c for c in _read_lines(concepts_file) if c]
    gt = root / "Groundtruth" / "TrainTestLabels"
    parts = {"train": "Train", "test": "Test"}

    def entries():
        for split, part in parts.items():
            names = [n for n in _read_lines(root / "ImageList" / f"{part}Imagelist.txt") if n]
            labels = np.zeros((len(names), len(classes)), np.int8)
            for c, concept in enumerate(classes):
                f = gt / f"Labels_{concept}_{part}.txt"
                vals = [v for v in _read_lines(f) if v]
                if len(vals) != len(names):
                    raise SourceError(f"{f}: {len(vals)} values but {part}Imagelist.txt lists "
                                      f"{len(names)} images; the files must be aligned line by line")
                for i, v in enumerate(vals):
                    if v not in ("0", "1"):
                        raise SourceError(f"{f}:{i + 1}: expected 0 or 1, got {v!r}")
                labels[:, c] = np.array(vals, dtype=np.int8)
            img_root = images_dir.get(split) or images_dir.get("all") or root / "Flickr"
            img_root = Path(img_root) if Path(img_root).is_absolute() else root / img_root
            for name, lab in zip(names, labels):
                rel = name.replace("\\", "/")
                image = img_root / rel
                yield Item(rel.rsplit(".", 1)[0], image, _rel(image, root), lab, split)

    return collect("nuswide", root, classes, entries(), keep_empty)


# --------------------------------------------------------------------------------------------
# CSV

def read_csv(csv_file: Path, images: Optional[Path] = None, path_column: Optional[str] = None,
             classes: Optional[list[str]] = None, keep_empty: bool = False, **_) -> SourceDataset:
    csv_file = Path(csv_file)
    root = Path(images) if images else csv_file.parent
    if not csv_file.is_file():
        raise SourceError(f"{csv_file}: CSV file not found")
    with open(csv_file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SourceError(f"{csv_file}: empty file; expected a header row") from None
        except csv.Error as e:
            raise SourceError(f"{csv_file}:1: malformed CSV ({e})") from None
        rows = []
        try:
            for row in reader:
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) != len(header):
                    raise SourceError(f"{csv_file}:{reader.line_num}: {len(row)} fields, header has "
                                      f"{len(header)}; quote fields that contain commas")
                rows.append((reader.line_num, [v.strip() for v in row]))
        except csv.Error as e:
            raise SourceError(f"{csv_file}:{reader.line_num}: malformed CSV ({e})") from None
    col = {h: i for i, h in enumerate(header)}
    if path_column is None:
        path_column = next((c for c in ("image", "path", "filename") if c in col), None)
        if path_column is None:
            raise SourceError(f"{csv_file}: no image/path/filename column in header {header}; "
                              "pass --path-column NAME")
    elif path_column not in col:
        raise SourceError(f"{csv_file}: --path-column {path_column!r} not in header {header}")
    special = {path_column, "split", "key"}
    multi_hot = "labels" not in col
    if multi_hot:
        names = [h for h in header if h not in special]
        if classes is not None and list(classes) != names:
            raise SourceError(f"{csv_file}: --classes {list(classes)} differ from the class "
                              f"columns {names}")
        classes = names
        if not classes:
            raise SourceError(f"{csv_file}: no label columns; add a 'labels' column (names joined "
                              "by '|') or one 0/1/-1 column per class")
    elif classes is None:
        classes = sorted({n.strip() for _, r in rows for n in r[col["labels"]].split("|")
                          if n.strip()})
    index = {c: i for i, c in enumerate(classes)}

    def entries():
        for line, r in rows:
            rel = r[col[path_column]]
            if not rel:
                raise SourceError(f"{csv_file}:{line}: empty {path_column!r}")
            split = r[col["split"]] if "split" in col else "train"
            if split not in SPLITS:
                raise SourceError(f"{csv_file}:{line}: split {split!r} is not one of {list(SPLITS)}")
            image = Path(rel) if Path(rel).is_absolute() else root / rel
            raw_key = r[col["key"]] if "key" in col and r[col["key"]] else rel.rsplit(".", 1)[0]
            labels = np.zeros(len(classes), np.int8)
            if multi_hot:
                for c, name in enumerate(classes):
                    v = r[col[name]]
                    if v not in ("0", "1", "-1"):
                        raise SourceError(f"{csv_file}:{line}: column {name!r} = {v!r}; "
                                          "expected 1, 0 or -1 (ignore)")
                    labels[c] = int(v)
            else:
                unknown = None
                for n in (n.strip() for n in r[col["labels"]].split("|")):
                    if not n:
                        continue
                    if n not in index:
                        unknown = n
                        break
                    labels[index[n]] = 1
                if unknown is not None:
                    yield Reject(raw_key, _rel(image, root), "unknown class", split,
                                 f"{csv_file}:{line}: {unknown!r} not in --classes")
                    continue
            yield Item(raw_key, image, _rel(image, root), labels, split)

    return collect("csv", root, classes, entries(), keep_empty)


READERS = {"voc": read_voc, "coco": read_coco, "nuswide": read_nuswide, "csv": read_csv}


def read_source(kind: str, root: Path, **options) -> SourceDataset:
    if kind not in READERS:
        raise SourceError(f"unknown dataset kind {kind!r}; choose one of {sorted(READERS)}")
    return READERS[kind](Path(root), **options)
