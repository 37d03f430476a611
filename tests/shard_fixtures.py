"""Tiny on-disk datasets (VOC, COCO, NUS-WIDE, CSV) and ready-made shards, shared by the tests.

    from shard_fixtures import build_small_shards      # tests/ is on sys.path under pytest
    shards = build_small_shards(tmp_path)            # -> tmp_path/"shards" (manifest.json inside)

Images are real JPEGs whose content follows the labels: class c draws a blob of colour PALETTE[c]
(shape c % 3), so a tiny model can learn them; "ignore" (-1) labels draw a smaller blob, like a
VOC "difficult" object. Each `make_*` builder returns an `Expected` describing what the shard
writer must keep, reject (and why) and re-encode; `bad=True` adds every kind of broken input.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0), (0, 0, 0)]

# image-level broken inputs: name -> expected outcome ("reject: REASON" or "converted")
BAD_IMAGES = {
    "zero": "reject: zero-byte image",
    "truncated": "reject: corrupt image",
    "notimage": "reject: corrupt image",
    "png": "converted",
    "gray": "converted",
    "cmyk": "converted",
    "palette": "converted",
}


@dataclass
class Expected:
    """What a correct shard run must produce for a fixture dataset (keys are sanitised keys)."""
    classes: list[str]
    labels: dict = field(default_factory=dict)     # key -> (C,) int8 for every kept sample
    splits: dict = field(default_factory=dict)     # key -> split (None: train or carved val)
    rejects: dict = field(default_factory=dict)    # key -> reason
    converted: set = field(default_factory=set)    # keys whose image must be re-encoded
    num_inputs: int = 0
    names: set = field(default_factory=set)        # class names in the annotations (VOC)

    def keep(self, key, labels, split):
        self.labels[key] = np.asarray(labels, np.int8)
        self.splits[key] = split
        self.num_inputs += 1

    def reject(self, key, reason):
        self.rejects[key] = reason
        self.num_inputs += 1

    def reindex(self, classes) -> "Expected":
        """The same dataset with label columns in `classes` order (a class not in self.classes
        gets an all-zero column): what a reader that picks its own class list must produce."""
        cols = [self.classes.index(c) if c in self.classes else None for c in classes]
        out = Expected(list(classes), dict(self.labels), dict(self.splits), dict(self.rejects),
                       set(self.converted), self.num_inputs, set(self.names))
        out.labels = {k: np.array([v[i] if i is not None else 0 for i in cols], np.int8)
                      for k, v in self.labels.items()}
        return out


# --------------------------------------------------------------------------------------------
# images

def draw_image(labels, size=(64, 48), rng=None) -> Image.Image:
    """An RGB image (size = (width, height)) with one coloured blob per nonzero label."""
    rng = rng if rng is not None else np.random.default_rng(0)
    w, h = size
    base = rng.integers(90, 150, (h, w, 1)) + rng.integers(-15, 15, (h, w, 3))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for c in np.flatnonzero(np.asarray(labels) != 0):
        side = rng.uniform(0.3, 0.45) * min(w, h) * (0.6 if labels[c] == -1 else 1.0)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = [x0, y0, x0 + side, y0 + side]
        colour = PALETTE[c % len(PALETTE)]
        if c % 3 == 0:
            draw.ellipse(box, fill=colour)
        elif c % 3 == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0, y0 + side), (x0 + side / 2, y0), (x0 + side, y0 + side)], fill=colour)
    return im


def jpeg_bytes(im: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_bad_image(path_stem: Path, kind: str, labels, size, rng) -> Path:
    """Write the broken/odd image `kind` (a BAD_IMAGES name); return its path (suffix varies)."""
    im = draw_image(labels, size, rng)
    if kind == "zero":
        p = path_stem.with_suffix(".jpg"); p.write_bytes(b"")
    elif kind == "truncated":
        p = path_stem.with_suffix(".jpg"); data = jpeg_bytes(im); p.write_bytes(data[: len(data) // 2])
    elif kind == "notimage":
        p = path_stem.with_suffix(".jpg"); p.write_bytes(b"this is not an image\n" * 20)
    elif kind == "png":
        p = path_stem.with_suffix(".png"); im.save(p)
    elif kind == "gray":
        p = path_stem.with_suffix(".jpg"); im.convert("L").save(p, "JPEG")
    elif kind == "cmyk":
        p = path_stem.with_suffix(".jpg"); im.convert("CMYK").save(p, "JPEG")
    elif kind == "palette":
        p = path_stem.with_suffix(".png"); im.convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    else:
        raise ValueError(f"unknown bad image kind {kind!r}; choose from {sorted(BAD_IMAGES)}")
    return p


def random_labels(rng, num_classes, with_ignore=True, p=0.35) -> np.ndarray:
    """(C,) int8 with at least one positive; some positives become -1 when with_ignore."""
    lab = (rng.random(num_classes) < p).astype(np.int8)
    if not lab.any():
        lab[rng.integers(num_classes)] = 1
    if with_ignore:
        pos = np.flatnonzero(lab == 1)
        for c in pos[1:]:  # keep the first positive so the sample is never label-less
            if rng.random() < 0.25:
                lab[c] = -1
    return lab


def _apply_bad(exp: Expected, key: str, kind: str, labels, split):
    outcome = BAD_IMAGES[kind]
    if outcome.startswith("reject: "):
        exp.reject(key, outcome[len("reject: "):])
    else:
        exp.keep(key, labels, split)
        exp.converted.add(key)


# --------------------------------------------------------------------------------------------
# CSV

def make_csv(root, n=None, num_classes=4, image_size=(64, 48), seed=0, with_ignore=True,
             label_format="columns", with_split=True, bad=False) -> tuple[Path, Expected]:
    """ROOT/*.{jpg,png} + ROOT/labels.csv (paths relative to ROOT, so key = file stem).
    n = {"train": 20, "val": 6, "test": 6}.

    label_format "columns": one 1/0/-1 column per class c0..; "labels": names joined by "|"
    (no -1 possible). Without a split column every row is train (the writer carves val).
    """
    root = Path(root)
    n = n or {"train": 20, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(num_classes)]
    exp = Expected(classes)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    ignore = with_ignore and label_format == "columns"
    for split, count in n.items():
        for i in range(count):
            key = f"{split}_{i:04d}"
            lab = random_labels(rng, num_classes, ignore)
            draw_image(lab, image_size, rng).save(root / f"{key}.jpg", quality=90)
            rows.append((f"{key}.jpg", lab, split))
            exp.keep(key, lab, split if with_split else None)
    if bad:
        for kind in BAD_IMAGES:
            key = f"bad_{kind}"
            lab = random_labels(rng, num_classes, ignore)
            p = write_bad_image(root / key, kind, lab, image_size, rng)
            rows.append((p.name, lab, "train"))
            _apply_bad(exp, key, kind, lab, "train" if with_split else None)
        lab = random_labels(rng, num_classes, ignore)
        rows.append(("missing_0.jpg", lab, "train")); exp.reject("missing_0", "missing image")
        draw_image(lab, image_size, rng).save(root / "empty_0.jpg")
        rows.append(("empty_0.jpg", np.zeros(num_classes, np.int8), "train"))
        exp.reject("empty_0", "no labels")
        rows.append(rows[0]); exp.num_inputs += 1  # duplicate of the first row: a second reject
        exp.rejects.setdefault("__duplicate__", "duplicate key")
    with open(root / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        head = ["image"] + (classes if label_format == "columns" else ["labels"])
        wr.writerow(head + (["split"] if with_split else []))
        for path, lab, split in rows:
            vals = ([str(int(v)) for v in lab] if label_format == "columns"
                    else ["|".join(classes[c] for c in np.flatnonzero(lab == 1))])
            wr.writerow([path] + vals + ([split] if with_split else []))
    return root / "labels.csv", exp


# --------------------------------------------------------------------------------------------
# VOC

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def _voc_xml(img_id, objects, size, filename=None) -> str:
    objs = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{int(diff)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   f"<xmax>10</xmax><ymax>10</ymax></bndbox></object>" for name, diff in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename or img_id + '.jpg'}</filename><size>"
            f"<width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"{objs}</annotation>\n")


def make_voc(root, n_train=10, n_val=4, n_test=6, image_size=(64, 48), seed=0,
             trainval_only=False, bad=False, malformed=False, classes=VOC_CLASSES, classes_used=6,
             layout="lists", png_every=0, cover_all=False) -> Expected:
    """A VOC2007-style tree whose objects are drawn from the first `classes_used` of `classes`.

    The returned Expected has `classes` as its class list (what `--classes FILE` listing them
    gives); `exp.reindex(sorted(exp.names))` is what the default (the union of names) gives.
    layout: "lists" = ImageSets/Main/{train,val,test}.txt (trainval_only: trainval.txt +
    test.txt, val gets carved); "default" = one default.txt (CVAT's export of a task without
    subsets) and "flat" = no ImageSets at all: every image is train, val gets carved.
    png_every=k: every k-th image is a PNG saved as JPEGImages/ID.png and named so in the
    XML's <filename> (the writer re-encodes it). cover_all: the first `classes_used` images each
    hold one more class, in a shuffled order, so that every used class occurs.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    exp = Expected(classes)
    lists = {"train": [], "val": [], "test": []}
    next_id = iter(range(1, 10**6))
    one_split = layout in ("default", "flat")
    cover = [int(c) for c in rng.permutation(classes_used)] if cover_all else []
    if one_split:
        trainval_only = True

    def add(split, objects=None, image_kind=None, write_image=True):
        img_id = f"{next(next_id):06d}"
        if objects is None and cover_all and cover:
            objects = [(classes[cover.pop()], False)]
        if objects is None:
            picked = rng.choice(classes_used, size=rng.integers(1, 3), replace=False)
            objects = [(classes[c], bool(rng.random() < 0.3)) for c in picked]
            objects += [(classes[picked[0]], False)] if rng.random() < 0.3 else []
        lab = np.zeros(len(classes), np.int8)
        for name, diff in objects:
            exp.names.add(name)
            if name in classes:
                c = classes.index(name)
                lab[c] = 1 if not diff else (lab[c] or -1)
        png = png_every and write_image and not image_kind and int(img_id) % png_every == 0
        filename = f"{img_id}.png" if png else None
        (root / "Annotations" / f"{img_id}.xml").write_text(_voc_xml(img_id, objects, image_size,
                                                                     filename))
        if write_image:
            if image_kind:
                p = write_bad_image(root / "JPEGImages" / img_id, image_kind, lab, image_size, rng)
                if p.suffix != ".jpg":  # VOC names images ID.jpg: keep the PNG bytes under .jpg
                    p.rename(p.with_suffix(".jpg"))
            elif png:
                draw_image(lab, image_size, rng).save(root / "JPEGImages" / filename)
                exp.converted.add(img_id)
            else:
                draw_image(lab, image_size, rng).save(root / "JPEGImages" / f"{img_id}.jpg")
        lists["train" if one_split else split].append(img_id)
        return img_id, lab

    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(count):
            img_id, lab = add(split)
            exp.keep(img_id, lab, None if trainval_only and (split != "test" or one_split) else split)
    # an image whose only objects are difficult: kept, all -1
    name = "dog" if "dog" in classes else classes[classes_used - 1]
    img_id, lab = add("train", objects=[(name, True), (name, True)])
    exp.keep(img_id, lab, None if trainval_only else "train")
    if bad:
        for kind in BAD_IMAGES:
            img_id, lab = add("train", image_kind=kind)
            _apply_bad(exp, img_id, kind, lab, None if trainval_only else "train")
        img_id, _ = add("train", write_image=False); exp.reject(img_id, "missing image")
        img_id, _ = add("train", objects=[("unicorn", False), ("dog", False)])
        exp.reject(img_id, "unknown class")
        img_id, _ = add("train", objects=[]); exp.reject(img_id, "no labels")
        lists["test"].append(lists["train"][0]); exp.num_inputs += 1  # listed twice
        exp.rejects.setdefault("__duplicate__", "duplicate key")
    if malformed:
        img_id, _ = add("train")
        (root / "Annotations" / f"{img_id}.xml").write_text("<annotation>\n<object><name>dog\n"
                                                            "</annotation>\n")
    main = root / "ImageSets" / "Main"
    if layout == "flat":
        main.rmdir()
        (root / "ImageSets").rmdir()
        return exp
    if layout == "default":
        (main / "default.txt").write_text("".join(i + "\n" for i in lists["train"]))
        return exp
    if trainval_only:
        (main / "trainval.txt").write_text("".join(i + "\n" for i in lists["train"] + lists["val"]))
    else:
        (main / "train.txt").write_text("".join(i + "\n" for i in lists["train"]))
        (main / "val.txt").write_text("".join(i + "\n" for i in lists["val"]))
    (main / "test.txt").write_text("".join(i + "\n" for i in lists["test"]))
    return exp


# --------------------------------------------------------------------------------------------
# COCO

COCO_CATEGORIES = [(1, "person"), (3, "car"), (18, "dog"), (90, "toothbrush")]  # non-contiguous


def make_coco(root, n_train=12, n_val=6, image_size=(64, 48), seed=0, bad=False,
              malformed=False) -> Expected:
    """ROOT/annotations/instances_{train,val}2014.json + ROOT/{train,val}2014/*.jpg."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = [name for _, name in sorted(COCO_CATEGORIES)]
    exp = Expected(classes)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = iter(range(1, 10**6))
    for split, count, name in (("train", n_train, "train2014"), ("val", n_val, "val2014")):
        (root / name).mkdir(exist_ok=True)
        images, anns = [], []

        def add(lab, kind=None, write=True, file_name=None):
            image_id = len(images) + 1 + (0 if split == "train" else 10**5)
            stem = f"COCO_{name}_{image_id:012d}"
            fname = file_name or f"{stem}.jpg"
            if write:
                if kind:
                    p = write_bad_image(root / name / stem, kind, lab, image_size, rng)
                    fname = p.name
                else:
                    draw_image(lab, image_size, rng).save(root / name / fname)
            images.append({"id": image_id, "file_name": fname, "width": image_size[0],
                           "height": image_size[1]})
            for c in np.flatnonzero(lab == 1):
                for _ in range(int(rng.integers(1, 3))):  # several instances of one class
                    anns.append({"id": next(ann_id), "image_id": image_id, "iscrowd": 0,
                                 "category_id": sorted(COCO_CATEGORIES)[c][0],
                                 "bbox": [0, 0, 5, 5], "area": 25})
            return Path(fname).stem

        for _ in range(count):
            lab = random_labels(rng, len(classes), with_ignore=False)
            exp.keep(add(lab), lab, split)
        if bad and split == "train":
            for kind in BAD_IMAGES:
                lab = random_labels(rng, len(classes), with_ignore=False)
                _apply_bad(exp, add(lab, kind), kind, lab, "train")
            lab = random_labels(rng, len(classes), with_ignore=False)
            exp.reject(add(lab, write=False), "missing image")
            exp.reject(add(np.zeros(len(classes), np.int8)), "no labels")
            images.append(dict(images[0], id=images[-1]["id"] + 1)); exp.num_inputs += 1
            exp.rejects.setdefault("__duplicate__", "duplicate key")
        cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES[::-1]]
        doc = {"info": {}, "images": images, "annotations": anns, "categories": cats}
        text = json.dumps(doc, indent=1)
        if malformed and split == "train":
            text = text.replace('"annotations": [', '"annotations": [,', 1)
        (root / "annotations" / f"instances_{name}.json").write_text(text)
    return exp


def make_coco_export(root, layout="roboflow", n_train=8, n_val=4, image_size=(32, 24),
                     seed=0) -> tuple[Expected, dict]:
    """A COCO export as annotation tools write it; returns (Expected, --split mapping).

    "roboflow": ROOT/{train,valid}/_annotations.coco.json with the images beside them, file names
    like "img_0001_jpg.rf.<hash>.jpg", and Roboflow's placeholder category id 0 (the others'
    supercategory, never annotated: not a class). "flat": ROOT/labels.json, images directly in
    ROOT, one train split (val gets carved).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = ["bolt", "gear", "nut"]
    cats = [{"id": i + 1, "name": n, "supercategory": "parts"} for i, n in enumerate(names)]
    if layout == "roboflow":
        cats = [{"id": 0, "name": "parts", "supercategory": "none"}] + cats
        parts = [("train", "train", n_train), ("val", "valid", n_val)]
    else:
        parts = [("train", ".", n_train + n_val)]
    exp = Expected(names)
    splits = {}
    for split, folder, count in parts:
        (root / folder).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            lab = random_labels(rng, len(names), with_ignore=False)
            stem = f"{split}_{i:04d}_jpg.rf.{rng.integers(16**8):08x}" if layout == "roboflow" \
                else f"photo {split} {i}"
            draw_image(lab, image_size, rng).save(root / folder / f"{stem}.jpg")
            images.append({"id": len(images), "file_name": f"{stem}.jpg", "width": image_size[0],
                           "height": image_size[1]})
            anns += [{"id": len(anns) + k, "image_id": len(images) - 1, "category_id": int(c) + 1,
                      "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}
                     for k, c in enumerate(np.flatnonzero(lab == 1))]
            key = stem.replace(".", "_").replace(" ", "_")
            exp.keep(key, lab, split if layout == "roboflow" else None)
        ann = root / folder / ("_annotations.coco.json" if layout == "roboflow" else "labels.json")
        ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        splits[split] = str(ann.relative_to(root))
    return exp, splits


# --------------------------------------------------------------------------------------------
# NUS-WIDE

def make_nuswide(root, n_train=12, n_test=6, concepts=("animal", "beach", "sky", "water"),
                 image_size=(64, 48), seed=0, n_missing=2, n_empty=1) -> Expected:
    """The standard NUS-WIDE tree (ImageList/, ConceptsList/Concepts81.txt,
    Groundtruth/TrainTestLabels/, Flickr/<concept>/<id>.jpg) with a few dead-URL images."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    exp = Expected(list(concepts))
    for d in ("ImageList", "ConceptsList", "Groundtruth/TrainTestLabels"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ConceptsList" / "Concepts81.txt").write_text("".join(c + "\n" for c in concepts))
    n = 0
    for split, part, count in (("train", "Train", n_train), ("test", "Test", n_test)):
        names, labels = [], []
        for i in range(count + (n_missing + n_empty if split == "train" else 0)):
            n += 1
            folder = concepts[n % len(concepts)]
            rel = f"{folder}/{n:04d}_{1000000 + n * 7}"
            missing = split == "train" and i >= count and i < count + n_missing
            empty = split == "train" and i >= count + n_missing
            lab = np.zeros(len(concepts), np.int8) if empty else \
                random_labels(rng, len(concepts), with_ignore=False)
            key = rel.replace("/", "_")
            if not missing:
                (root / "Flickr" / folder).mkdir(parents=True, exist_ok=True)
                draw_image(lab, image_size, rng).save(root / "Flickr" / f"{rel}.jpg")
            if missing:
                exp.reject(key, "missing image")
            elif empty:
                exp.reject(key, "no labels")
            else:
                exp.keep(key, lab, None if split == "train" else "test")
            names.append(rel.replace("/", "\\") + ".jpg")  # the official lists use backslashes
            labels.append(lab)
        (root / "ImageList" / f"{part}Imagelist.txt").write_text("".join(x + "\r\n" for x in names))
        labels = np.stack(labels)
        for c, concept in enumerate(concepts):
            (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{part}.txt").write_text(
                "".join(f"{v}\n" for v in labels[:, c]))
    return exp


# --------------------------------------------------------------------------------------------
# damage done to shards after they were written (the integrity tests)

def garble_sample(shards, split="train", shard=0, sample=0) -> tuple[Path, str]:
    """Overwrite the start of one sample's JPEG in place (same size: tar and index stay valid,
    only the image is broken). Returns (tar path, key)."""
    shards = Path(shards)
    tar, idx = shards / f"{split}-{shard:06d}.tar", shards / f"{split}-{shard:06d}.idx"
    fields = idx.read_text().splitlines()[1 + sample].split()
    comps = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
             for i in range(0, len(fields), 4)}
    offset, _, name = comps["jpg"]
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(b"garbage!" * 4)   # the SOI marker and headers: no decoder accepts it
    return tar, name.split(".")[0]


def truncate_shard(tar, keep=0.5) -> None:
    """Cut a tar to `keep` of its length (an interrupted copy)."""
    tar = Path(tar)
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------
# ready-made shards for the data-loader and trainer tests

def build_small_shards(out_dir, n_train=40, n_val=12, n_test=12, num_classes=4,
                       image_size=(64, 48), samples_per_shard=7, seed=0,
                       with_ignore=True) -> Path:
    """Write a CSV dataset under out_dir/"src" and shard it to out_dir/"shards"; return the latter.

    Several shards per split of uneven sizes (e.g. train 7,7,7,7,7,5), some -1 labels when
    with_ignore. Reuses an existing out_dir/"shards" (cheap in session-scoped fixtures).
    """
    from mlic_dist.shard import shard

    out_dir = Path(out_dir)
    shards = out_dir / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    n = {"train": n_train, "val": n_val, "test": n_test}
    csv_path, _ = make_csv(out_dir / "src", {k: v for k, v in n.items() if v}, num_classes,
                           image_size, seed, with_ignore)
    shard("csv", csv_path, shards, images=out_dir / "src", samples_per_shard=samples_per_shard,
          seed=seed, progress=False, verbose=False)
    return shards


def tiny_run_overrides(shards, out, **extra) -> list[str]:
    """Dotted overrides for a seconds-long CPU training run on `build_small_shards` data: tiny_cnn
    at 32 px, the torch loader, fp32, 2 epochs. `extra` adds or replaces keys (tracking, ...)."""
    base = {"data.shards": shards, "data.size": 32, "data.loader": "torch", "data.batch_size_per_gpu": 8,
            "data.num_workers": 1, "model.backbone": "tiny_cnn", "model.pretrained": "none",
            "train.epochs": 2, "train.mixed_precision": "no", "train.output_dir": out,
            "optim.lr_scaling": "none"}   # tiny batches keep a recipe's rates (tests/test_scale.py tests the rule)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
