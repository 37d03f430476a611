"""The CSV reader: one or several label files (one per split), with or without a header row, in
either of two value conventions. Produces the `SourceDataset` every reader does.

Layout:
- a path column (`--path-column`, else the first of image/path/filename/name) relative to the
  split's image folder (`--images-dir SPLIT=DIR`, else `--images`, else the CSV's own folder). A
  path without an image extension resolves to the image beside it: `000005` -> `000005.jpg` (or
  .jpeg / .png, whichever exists), as the VOC2007 CSVs of Wang et al. list bare ids.
- then either a `labels` column (class names joined by `|`; classes = the sorted union of the
  names, or `--classes FILE`) or one column per class.
- `--no-header --classes FILE`: no header row; the first column is the image, then one column
  per class in the classes file's order (the MS-COCO CSVs of Wang et al.).
- optional `split` (train/val/test; without it every row of the main file is train) and `key`
  columns. `--split NAME=FILE` adds files whose every row is NAME (one call imports trainval and
  test).

Class-column values follow `--csv-values` (CSV_VALUES), never a guess: `default` reads 1 / 0 / -1
as positive / negative / ignore, `voc` reads 1 / -1 / 0 as positive / negative / difficult, and
difficult becomes the ignore label (-1 in the shards; `data.difficult` decides how it trains). A
file that contradicts the chosen convention stops with one line naming the file, the counts and
the flag to pass: more entries coded "ignore" than "negative" cannot be a multi-label dataset
(negatives always dominate), so such a file is read in the other convention or not at all.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from .records import SPLITS, Item, Reject, SourceDataset, SourceError, collect

PATH_COLUMNS = ("image", "path", "filename", "name")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# convention -> (meaning of each raw value, raw value -> our label 1 / 0 / -1)
CSV_VALUES = {
    "default": ("1 positive, 0 negative, -1 ignore", {"1": 1, "0": 0, "-1": -1}),
    "voc": ("1 positive, -1 negative, 0 difficult (-> ignore)", {"1": 1, "-1": 0, "0": -1}),
}


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _read_rows(csv_file: Path, header: bool) -> tuple[Optional[list[str]], list[tuple[int, list[str]]]]:
    """(header or None, [(line number, stripped fields)]) with blank lines skipped."""
    if not csv_file.is_file():
        raise SourceError(f"{csv_file}: CSV file not found")
    with open(csv_file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        head = None
        if header:
            try:
                head = [h.strip() for h in next(reader)]
            except StopIteration:
                raise SourceError(f"{csv_file}: empty file; expected a header row") from None
            except csv.Error as e:
                raise SourceError(f"{csv_file}:1: malformed CSV ({e})") from None
        rows = []
        width = len(head) if head is not None else None
        try:
            for row in reader:
                if not row or all(not v.strip() for v in row):
                    continue
                width = len(row) if width is None else width
                if len(row) != width:
                    what = f"header has {width}" if head is not None else f"the first row has {width}"
                    raise SourceError(f"{csv_file}:{reader.line_num}: {len(row)} fields, {what}; "
                                      "quote fields that contain commas")
                rows.append((reader.line_num, [v.strip() for v in row]))
        except csv.Error as e:
            raise SourceError(f"{csv_file}:{reader.line_num}: malformed CSV ({e})") from None
    return head, rows


def _looks_like_data(head: list[str]) -> bool:
    """A header row that is really a sample: an image file name, or nothing but label values."""
    return bool(head) and (Path(head[0]).suffix in IMAGE_SUFFIXES
                           or (len(head) > 1 and all(v in ("0", "1", "-1") for v in head[1:])))


def _resolve_image(folder: Path, rel: str) -> Path:
    """folder/rel; a path without an image suffix: the first of rel.jpg / .jpeg / .png that exists."""
    image = Path(rel) if Path(rel).is_absolute() else folder / rel
    if Path(rel).suffix in IMAGE_SUFFIXES or image.is_file():
        return image
    for suffix in IMAGE_SUFFIXES:
        candidate = image.with_name(image.name + suffix)
        if candidate.is_file():
            return candidate
    return image.with_name(image.name + ".jpg")   # missing: a "missing image" reject names it


def _check_convention(csv_file: Path, counts: dict, csv_values: str) -> None:
    """Refuse a file whose values contradict `csv_values` (see the module docstring)."""
    ignore_code, negative_code = ("-1", "0") if csv_values == "default" else ("0", "-1")
    n_ignore, n_negative = counts.get(ignore_code, 0), counts.get(negative_code, 0)
    if n_ignore <= n_negative:
        return
    total = sum(counts.values())
    other = "voc" if csv_values == "default" else "default"
    raise SourceError(
        f"{csv_file}: {n_ignore} of {total} label entries are {ignore_code} and only {n_negative} are "
        f"{negative_code}; under --csv-values {csv_values} ({CSV_VALUES[csv_values][0]}) most labels "
        f"would be ignored, so the file follows the other convention ({CSV_VALUES[other][0]}): pass "
        f"--csv-values {other}")


def _file_plan(csv_file: Path, splits: Optional[dict]) -> list[tuple[Path, Optional[str]]]:
    """[(file, split or None = its split column / train)]: the main file, then --split files."""
    plan = [(csv_file, None)]
    for split, path in (splits or {}).items():
        if split == "all" or split not in SPLITS:
            raise SourceError(f"csv --split {split}={path}: expected SPLIT=FILE with SPLIT one of "
                              f"{list(SPLITS)} (e.g. --split test=classification_test.csv)")
        if split == "train":
            raise SourceError(f"csv --split train={path}: the positional CSV is the train file; pass "
                              f"{path} as the positional argument or name another split")
        plan.append((Path(path), split))
    return plan


def read_csv(csv_file: Path, images: Optional[Path] = None, path_column: Optional[str] = None,
             classes: Optional[list[str]] = None, keep_empty: bool = False,
             splits: Optional[dict] = None, images_dir: Optional[dict] = None,
             csv_values: str = "default", header: bool = True, **_) -> SourceDataset:
    csv_file = Path(csv_file)
    if csv_values not in CSV_VALUES:
        raise SourceError(f"--csv-values {csv_values!r}: choose one of {sorted(CSV_VALUES)}")
    if not header and classes is None:
        raise SourceError(f"{csv_file}: --no-header needs --classes FILE (the class of each column "
                          "after the image, in order)")
    images_dir = dict(images_dir or {})
    bad = [k for k in images_dir if k not in SPLITS and k != "all"]
    if bad:
        raise SourceError(f"--images-dir: unknown split name(s) {bad}; use train, val or test")
    plan = _file_plan(csv_file, splits)
    default_root = Path(images) if images else None
    files, notes, resolved = [], [], 0
    first_names, multi_hot = None, None
    for path, split in plan:
        head, rows = _read_rows(path, header)
        if head is None:
            head = ["image", *classes]
            if rows and len(rows[0][1]) != len(head):
                raise SourceError(f"{path}:{rows[0][0]}: {len(rows[0][1])} fields, but the image and "
                                  f"--classes' {len(classes)} classes make {len(head)}; pass the classes "
                                  "file that matches the columns")
        elif _looks_like_data(head):
            raise SourceError(f"{path}:1: the first row {','.join(head[:3])},... looks like a sample, not a "
                              "header; pass --no-header --classes FILE for a file without a header row")
        col = {h: i for i, h in enumerate(head)}
        pc = path_column or next((c for c in PATH_COLUMNS if c in col), None)
        if pc is None:
            raise SourceError(f"{path}: no {'/'.join(PATH_COLUMNS)} column in header {head[:6]}; pass "
                              "--path-column NAME")
        if pc not in col:
            raise SourceError(f"{path}: --path-column {pc!r} not in header {head[:6]}")
        if split is not None and "split" in col:
            raise SourceError(f"{path}: has a 'split' column but is given as --split {split}=...; drop "
                              "one of the two")
        names = [h for h in head if h not in {pc, "split", "key"}]
        this_multi_hot = "labels" not in col
        if multi_hot is None:
            multi_hot, first_names = this_multi_hot, names
        elif this_multi_hot != multi_hot or (multi_hot and names != first_names):
            raise SourceError(f"{path}: its label columns {names[:5]}... differ from {plan[0][0]}'s "
                              f"{first_names[:5]}...; every split file needs the same columns")
        folder = Path(images_dir.get(split or "train") or images_dir.get("all") or default_root
                      or path.parent)
        files.append((path, split, rows, col, pc, folder))
    if multi_hot:
        if header and classes is not None and list(classes) != first_names:
            raise SourceError(f"{csv_file}: --classes {list(classes)} differ from the class "
                              f"columns {first_names}")
        classes_from = "dataset" if header else "file"
        classes = first_names
        if not classes:
            raise SourceError(f"{csv_file}: no label columns; add a 'labels' column (names joined "
                              "by '|') or one 0/1/-1 column per class")
        for path, _, rows, col, _, _ in files:
            counts: dict = {}
            for line, r in rows:
                for name in classes:
                    v = r[col[name]]
                    if v not in ("0", "1", "-1"):
                        raise SourceError(f"{path}:{line}: column {name!r} = {v!r}; expected 1, 0 "
                                          f"or -1 (--csv-values {csv_values}: {CSV_VALUES[csv_values][0]})")
                    counts[v] = counts.get(v, 0) + 1
            _check_convention(path, counts, csv_values)
        notes.append(f"class columns read with --csv-values {csv_values}: {CSV_VALUES[csv_values][0]}")
    else:
        if csv_values != "default":
            raise SourceError(f"{csv_file}: --csv-values {csv_values} applies to one 0/1/-1 column per "
                              "class; this file has a 'labels' column of names: drop --csv-values")
        classes_from = "file" if classes is not None else "data"
        if classes is None:
            classes = sorted({n.strip() for _, _, rows, col, _, _ in files for _, r in rows
                              for n in r[col["labels"]].split("|") if n.strip()})
    index = {c: i for i, c in enumerate(classes)}
    mapping = CSV_VALUES[csv_values][1]

    def entries():
        nonlocal resolved
        for path, fixed_split, rows, col, pc, folder in files:
            for line, r in rows:
                rel = r[col[pc]]
                if not rel:
                    raise SourceError(f"{path}:{line}: empty {pc!r}")
                split = fixed_split or (r[col["split"]] if "split" in col else "train")
                if split not in SPLITS:
                    raise SourceError(f"{path}:{line}: split {split!r} is not one of {list(SPLITS)}")
                image = _resolve_image(folder, rel)
                resolved += Path(rel).suffix not in IMAGE_SUFFIXES and image.is_file()
                raw_key = r[col["key"]] if "key" in col and r[col["key"]] else \
                    (rel.rsplit(".", 1)[0] if Path(rel).suffix in IMAGE_SUFFIXES else rel)
                labels = np.zeros(len(classes), np.int8)
                if multi_hot:
                    for c, name in enumerate(classes):
                        labels[c] = mapping[r[col[name]]]
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
                        yield Reject(raw_key, _rel(image, folder), "unknown class", split,
                                     f"{path}:{line}: {unknown!r} not in --classes")
                        continue
                yield Item(raw_key, image, _rel(image, folder), labels, split)

    ds = collect("csv", default_root or csv_file.parent, classes, entries(), keep_empty, classes_from, notes)
    if resolved:
        ds.notes.append(f"{resolved} image paths without an extension resolved to the file beside them "
                        "(e.g. 000005 -> 000005.jpg)")
    if len(files) > 1:
        ds.notes.append("split files: " + ", ".join(f"{s or 'train'}={p}" for p, s, *_ in files))
    return ds
