"""Dataset readers: one function per on-disk format, all producing the same `SourceDataset`.

Each reader yields `Item`s (a labelled image) or `Reject`s (an annotation that cannot become a
sample: unknown class, missing annotation); `records.collect` then applies the rules every format
shares (dot-free unique keys, duplicate keys, missing image files, empty label sets). Images are
not opened here: decoding is the writer's job, in worker processes.

Accepted layouts (ROOT is the positional argument of `python -m mlic_dist.shard KIND ROOT`):
- voc:     ROOT/Annotations/ID.xml, ROOT/JPEGImages/ID.jpg (or the XML's <filename>, or ID.jpeg /
           ID.png), ROOT/ImageSets/Main/{trainval,test}.txt (or train.txt + val.txt, read together
           as trainval; or default.txt, as CVAT exports a task without subsets; or no lists at
           all: every Annotations/*.xml is train). Val is carved from trainval (the paper's
           protocol); `--voc-val official` keeps train.txt / val.txt as train / val instead. Classes = `--classes FILE`, else the sorted union of
           the object names found (for VOC2007/2012 exactly the official 20-class order), so
           labeling-tool exports with their own names work. A class seen only on "difficult"
           objects is -1.
- coco:    one annotation JSON per split (`--split train=ANN.json`), any name (instances_*.json,
           Roboflow's _annotations.coco.json, ...). Images: `--images-dir split=DIR`, else the first
           of ROOT/<name> (for instances_<name>.json), the JSON's own folder, ROOT, .../images
           holding the first few `file_name`s. Classes = categories by id, less a Roboflow-style
           placeholder (a category that is only the others' supercategory and is never used).
- nuswide: ROOT/ImageList/{Train,Test}Imagelist.txt (Windows `\\` separators accepted),
           ROOT/ConceptsList/Concepts81.txt (or ROOT/Concepts81.txt),
           ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt (one 0/1 a line,
           aligned with the image list), images in ROOT/Flickr/<list entry> (or `--images-dir`).
- csv:     a CSV (or one per split) of image paths and labels; mlic_dist/shard/csv_source.py
           describes the columns, `--no-header`, `--csv-values` and `--split NAME=FILE`.
Unknown class names are *rejects* (counted, reason "unknown class"), not errors, so one typo does
not kill a long run; many of them trip --max-reject-fraction. Malformed files are errors that name
the file and line.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .csv_source import read_csv
from .records import SPLITS, Item, Reject, SourceDataset, SourceError, collect

# VOC2007/2012's classes: also the sorted union of their object names, which read_voc uses
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


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

VOC_VAL = ("carve", "official")   # --voc-val: how a VOC tree gets its validation split


def _voc_lists(root: Path, voc_val: str = "carve") -> tuple[dict, list[str]]:
    """{split: [image ids]} from ImageSets/Main, and notes on what was assumed.

    voc_val "carve" (the paper's protocol, the default): train on trainval (trainval.txt, else
    train.txt + val.txt merged); the caller carves val out of it by iterative stratification.
    "official": train.txt as train and val.txt as val, as the VOC devkit splits them."""
    main = root / "ImageSets" / "Main"
    lists = {s: main / f"{s}.txt" for s in ("train", "val", "test", "trainval", "default")}
    notes = []
    if voc_val not in VOC_VAL:
        raise SourceError(f"--voc-val {voc_val!r}: choose one of {list(VOC_VAL)}")
    if voc_val == "official":
        if not (lists["train"].is_file() and lists["val"].is_file()):
            raise SourceError(f"--voc-val official needs {lists['train']} and {lists['val']}; drop "
                              "--voc-val to carve val out of trainval")
        use = {"train": [lists["train"]], "val": [lists["val"]]}
        notes.append("official VOC split (--voc-val official): train.txt as train, val.txt as val")
    elif lists["trainval"].is_file():
        use = {"train": [lists["trainval"]]}  # val is carved from it later (stratified)
    elif lists["train"].is_file() and lists["val"].is_file():
        use = {"train": [lists["train"], lists["val"]]}
        notes.append("train.txt + val.txt read together as train (trainval), val carved from it; "
                     "--voc-val official keeps the official split")
    elif lists["train"].is_file():
        use = {"train": [lists["train"]]}
    elif lists["default"].is_file():    # CVAT's "Pascal VOC" export of a task without subsets
        use = {"train": [lists["default"]]}
        notes.append(f"{lists['default']} read as the train split")
    elif sorted((root / "Annotations").glob("*.xml")):
        ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
        notes.append(f"no image lists in {main}: all {len(ids)} Annotations/*.xml read as the train split")
        return {"train": ids}, notes
    else:
        raise SourceError(f"{main}: need train.txt + val.txt, trainval.txt or default.txt, or at least "
                          "ROOT/Annotations/*.xml (VOC layout: ROOT/ImageSets/Main, ROOT/Annotations, "
                          "ROOT/JPEGImages)")
    if lists["test"].is_file():
        use["test"] = [lists["test"]]
    return {split: [ln.split()[0] for lst in files for ln in _read_lines(lst) if ln]
            for split, files in use.items()}, notes


def read_voc(root: Path, classes: Optional[list[str]] = None, keep_empty: bool = False,
             voc_val: str = "carve", **_) -> SourceDataset:
    ids, notes = _voc_lists(root, voc_val)
    parsed = [(split, img_id, _voc_objects(root, img_id, split))
              for split, lst in ids.items() for img_id in lst]
    if classes is None:   # VOC2007/2012: the sorted union is exactly VOC_CLASSES
        classes = sorted({name for _, _, objs in parsed if not isinstance(objs, Reject)
                          for name, _ in objs[1] if name})
        classes_from = "data"
        if not classes:
            raise SourceError(f"{root / 'Annotations'}: no <object><name> in any listed annotation; "
                              "nothing to learn")
    else:
        classes_from = "file"
    index = {c: i for i, c in enumerate(classes)}

    def entries():
        for split, img_id, objs in parsed:
            yield objs if isinstance(objs, Reject) else _voc_item(img_id, split, objs, index)

    return collect("voc", root, list(classes), entries(), keep_empty, classes_from, notes)


def _voc_image(root: Path, img_id: str, filename: str) -> Path:
    """JPEGImages/ID.jpg, else the XML's <filename>, else ID with another image suffix."""
    folder = root / "JPEGImages"
    names = [f"{img_id}.jpg"] + ([filename] if filename else []) + \
            [f"{img_id}{ext}" for ext in (".jpeg", ".JPG", ".JPEG", ".png", ".PNG")]
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def _voc_objects(root: Path, img_id: str, split: str) -> Union[tuple, Reject]:
    """(image path, [(name, difficult)], xml path) or a Reject for a missing annotation."""
    xml_path = root / "Annotations" / f"{img_id}.xml"
    if not xml_path.is_file():
        image = root / "JPEGImages" / f"{img_id}.jpg"
        return Reject(img_id, _rel(image, root), "missing annotation", split, str(xml_path))
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        line, col = e.position
        raise SourceError(f"{xml_path}:{line}:{col}: malformed XML ({e}); fix or remove the file "
                          f"and its id from ImageSets/Main/{split}.txt") from None
    objects = [((obj.findtext("name") or "").strip(),
                (obj.findtext("difficult") or "0").strip() == "1") for obj in tree.getroot().iter("object")]
    image = _voc_image(root, img_id, (tree.getroot().findtext("filename") or "").strip())
    return image, objects, xml_path


def _voc_item(img_id: str, split: str, parsed: tuple, index: dict) -> Union[Item, Reject]:
    image, objects, xml_path = parsed
    root = xml_path.parent.parent
    source = _rel(image, root)
    labels = np.zeros(len(index), np.int8)
    for name, difficult in objects:
        if name not in index:
            return Reject(img_id, source, "unknown class", split,
                          f"{xml_path}: object name {name!r}" + ("" if name else " (empty <name>)"))
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
    loaded, cats = {}, None
    for split, ann in splits.items():
        ann = Path(ann) if Path(ann).is_absolute() else root / ann
        data = _load_json(ann)
        for k in ("images", "annotations", "categories"):
            if not isinstance(data.get(k), list):
                raise SourceError(f"{ann}: missing list {k!r}; expected a COCO instances file")
        try:
            these = sorted(((c["id"], c["name"], c.get("supercategory")) for c in data["categories"]),
                           key=lambda c: c[0])
        except (KeyError, TypeError):
            raise SourceError(f"{ann}: a category lacks 'id' or 'name'") from None
        if cats is None:
            cats = these
        elif [c[:2] for c in these] != [c[:2] for c in cats]:
            raise SourceError(f"{ann}: categories differ from the first split's; all splits must "
                              "share one category list")
        loaded[split] = (ann, data)
    cats, notes = _drop_placeholder_categories(cats, loaded)
    classes = [name for _, name, _ in cats]
    col = {cid: i for i, (cid, _, _) in enumerate(cats)}

    def entries():
        for split in (s for s in SPLITS if s in loaded):
            ann, data = loaded[split]
            img_dir = images_dir.get(split) or images_dir.get("all")
            if img_dir is None:   # inferred: already under root (joining root again doubles it)
                img_dir = _coco_image_dir(root, ann, split, data["images"])
            else:                 # given: relative to root
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

    return collect("coco", root, classes, entries(), keep_empty, "dataset", notes)


def _drop_placeholder_categories(cats: list, loaded: dict) -> tuple[list, list[str]]:
    """Roboflow's COCO export lists a category (id 0) that only names the others' supercategory
    and that no annotation uses; as a class it would never have a positive. Drop such ones."""
    used = {a.get("category_id") for _, data in loaded.values() for a in data["annotations"]
            if isinstance(a, dict)}
    keep, notes = [], []
    for cid, name, sup in cats:
        parent_of_others = any(s == name for c, _, s in cats if c != cid)
        if parent_of_others and cid not in used:
            notes.append(f"category {name!r} (id {cid}) dropped: it is only the supercategory of the "
                         "others and no annotation uses it (a Roboflow export's placeholder)")
        else:
            keep.append((cid, name, sup))
    return (keep, notes) if keep else (cats, [])


def _coco_image_dir(root: Path, ann: Path, split: str, images: list) -> Path:
    """The first candidate folder holding most of the first few `file_name`s of `images`."""
    m = re.match(r"instances_(.+)\.json$", ann.name)
    candidates = ([root / m.group(1)] if m else []) + [ann.parent, root, ann.parent / "images",
                                                       root / "images"]
    unique, seen = [], set()
    for c in candidates:
        if c.resolve() not in seen:
            seen.add(c.resolve())
            unique.append(c)
    names = [im["file_name"] for im in images[:8]
             if isinstance(im, dict) and isinstance(im.get("file_name"), str)]
    if not names:
        return unique[0]   # no images listed: nothing will be looked up
    hits = [sum((c / n).is_file() for n in names) for c in unique]
    best = max(range(len(unique)), key=lambda i: (hits[i], -i))
    if hits[best] == 0:
        raise SourceError(f"{ann}: cannot find its images: none of its first {len(names)} file_names "
                          f"(e.g. {names[0]!r}) is in any of {[str(c) for c in unique]}; pass "
                          f"--images-dir {split}=DIR")
    return unique[best]


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


READERS = {"voc": read_voc, "coco": read_coco, "nuswide": read_nuswide, "csv": read_csv}


def read_source(kind: str, root: Path, **options) -> SourceDataset:
    if kind not in READERS:
        raise SourceError(f"unknown dataset kind {kind!r}; choose one of {sorted(READERS)}")
    return READERS[kind](Path(root), **options)
