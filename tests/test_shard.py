"""Tests for mlic_dist.shard: every format, every kind of bad input, read back with webdataset and DALI."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic_dist.shard import ShardError, SourceError, shard
from mlic_dist.shard import writer as writer_mod
from mlic_dist.shard.__main__ import main as cli_main
from mlic_dist.shard.records import sanitize_key
from shard_fixtures import (BAD_IMAGES, VOC_CLASSES, build_small_shards, garble_sample, make_coco,
                            make_coco_export, make_csv, make_nuswide, make_voc, truncate_shard)

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, verbose=False)


# --------------------------------------------------------------------------------------------
# read-back helpers

def read_webdataset(out: Path, split: str) -> list[dict]:
    import webdataset as wds

    m = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["file"]) for s in m["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def read_dali(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(ids (N,), labels (N, C), image shapes) through DALI's own webdataset reader, CPU only."""
    from nvidia.dali import fn, pipeline_def, types

    m = json.loads((out / "manifest.json").read_text())
    shards = m["splits"][split]["shards"]
    n, bs = m["splits"][split]["num_samples"], 8

    @pipeline_def(batch_size=bs, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, sid = fn.readers.webdataset(
            paths=[str(out / s["file"]) for s in shards],
            index_paths=[str(out / s["index"]) for s in shards],
            ext=["jpg", "lbl", "id"], dtypes=[types.UINT8, types.INT8, types.INT64],
            missing_component_behavior="error", name="Reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, sid

    p = pipe()
    p.build()
    assert p.epoch_size("Reader") == n  # the index files carry the right sample counts
    ids, labels, shapes = [], [], []
    while len(ids) < n:
        img, lbl, sid = p.run()
        for k in range(bs):
            ids.append(int(np.array(sid[k])[0]))
            labels.append(np.array(lbl[k]))
            shapes.append(np.array(img[k]).shape)
    return np.array(ids[:n]), np.stack(labels[:n]), shapes[:n]


def verify_shards(out: Path, exp, expect_converted: bool = True) -> dict:
    """Every invariant of docs/contracts.md plus agreement with the fixture's expectations."""
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["classes"] == exp.classes
    C = len(exp.classes)
    seen = {}
    for split, info in m["splits"].items():
        keys = (out / info["keys_file"]).read_text().splitlines()
        assert len(keys) == info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
        for s in info["shards"]:
            assert s["file"] == f"{split}-{int(s['file'][len(split) + 1:-4]):06d}.tar"
            assert (out / s["index"]).is_file() and s["index"] == s["file"][:-4] + ".idx"
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        samples = read_webdataset(out, split)
        assert [s["__key__"] for s in samples] == keys
        counts = np.zeros((C, 2), int)
        for i, s in enumerate(samples):
            key = s["__key__"]
            assert "." not in key and key not in seen
            seen[key] = split
            assert np.frombuffer(s["id"], "<i8")[0] == i
            lbl = np.frombuffer(s["lbl"], np.int8)
            np.testing.assert_array_equal(lbl, exp.labels[key], err_msg=key)
            counts[:, 0] += lbl == 1
            counts[:, 1] += lbl == -1
            meta = json.loads(s["json"])
            assert meta["labels"] == [exp.classes[c] for c in np.flatnonzero(lbl == 1)]
            assert meta["ignored"] == [exp.classes[c] for c in np.flatnonzero(lbl == -1)]
            im = Image.open(io.BytesIO(s["jpg"]))
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (meta["width"], meta["height"]))
            want = exp.splits[key]
            assert split == want if want else split in ("train", "val"), key
        assert {c: {"positive": int(p), "ignore": int(g)} for c, (p, g) in
                zip(exp.classes, counts)} == info["label_counts"]
        ids, labels, shapes = read_dali(out, split)
        np.testing.assert_array_equal(ids, np.arange(len(keys)))
        np.testing.assert_array_equal(labels, np.stack([exp.labels[k] for k in keys]))
        for shape, s in zip(shapes, samples):
            meta = json.loads(s["json"])
            assert shape == (meta["height"], meta["width"], 3)
    assert set(seen) == set(exp.labels)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == Counter(exp.rejects.values())
    assert m["rejects"]["count"] == len(rejects)
    assert m["rejects"]["by_reason"] == dict(Counter(r["reason"] for r in rejects))
    for r in rejects:
        assert exp.rejects.get(r["key"], "duplicate key") == r["reason"], r
    assert len(seen) + len(rejects) == exp.num_inputs == m["num_inputs"]
    if expect_converted:
        assert m["converted"]["count"] == len(exp.converted)
    return m


# --------------------------------------------------------------------------------------------
# formats

def test_csv_via_cli_with_every_bad_input(tmp_path):
    csv_path, exp = make_csv(tmp_path / "src", {"train": 14, "val": 5, "test": 5}, bad=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images",
           str(tmp_path / "src"), "--out", str(out), "--samples-per-shard", "4",
           "--max-reject-fraction", "0.5", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout and "rejected: 6" in r.stdout
    m = verify_shards(out, exp)
    assert m["converted"]["by_reason"]["format PNG"] == 2
    assert {"mode L", "mode CMYK", "mode P"} <= set(m["converted"]["by_reason"])
    assert m["args"]["samples_per_shard"] == 4 and m["stats"]["images_per_s"] > 0
    assert all(s["num_samples"] <= 4 for s in m["splits"]["train"]["shards"])


def write_classes(path: Path, classes) -> Path:
    path.write_text("# one class a line\n" + "".join(c + "\n" for c in classes))
    return path


def test_voc_keeps_difficult_as_ignore(tmp_path):
    exp = make_voc(tmp_path / "voc", bad=True)
    m = shard("voc", tmp_path / "voc", tmp_path / "out", samples_per_shard=5,
              classes_file=write_classes(tmp_path / "voc.txt", VOC_CLASSES), voc_val="official",
              max_reject_fraction=0.5, **QUIET)   # with --classes, "unicorn" is an unknown class
    verify_shards(tmp_path / "out", exp)
    assert set(m["splits"]) == {"train", "val", "test"} and m["val_carved"] is None
    only_difficult = [k for k, v in exp.labels.items() if v[11] == -1 and (v != -1).sum() == 19]
    assert only_difficult and m["splits"]["train"]["label_counts"]["dog"]["ignore"] >= 1


def test_voc_carves_val_from_trainval_by_default_and_keeps_the_official_split_on_request(tmp_path):
    """The paper's protocol: train.txt + val.txt are one trainval split, val carved from it
    (stratified); --voc-val official keeps the devkit's val."""
    exp = make_voc(tmp_path / "voc", n_train=24, n_val=12, n_test=4)
    exp = exp.reindex(sorted(exp.names))
    official_val = {k for k, s in exp.splits.items() if s == "val"}
    for k, s in list(exp.splits.items()):
        if s in ("train", "val"):
            exp.splits[k] = None          # either: the carve decides
    m = shard("voc", tmp_path / "voc", tmp_path / "carve", val_fraction=0.25, **QUIET)
    verify_shards(tmp_path / "carve", exp)
    carved_val = set((tmp_path / "carve" / "val-keys.txt").read_text().split())
    n_trainval = sum(s is None for s in exp.splits.values())
    assert m["val_carved"]["train_samples"] + len(carved_val) == n_trainval
    assert len(carved_val) == round(0.25 * n_trainval)
    assert carved_val != official_val and any("trainval" in n for n in m["source_notes"])
    m = shard("voc", tmp_path / "voc", tmp_path / "official", voc_val="official", **QUIET)
    assert m["val_carved"] is None
    assert set((tmp_path / "official" / "val-keys.txt").read_text().split()) == official_val
    (tmp_path / "voc" / "ImageSets/Main/val.txt").unlink()
    with pytest.raises(SourceError, match="--voc-val official needs"):
        shard("voc", tmp_path / "voc", tmp_path / "o2", voc_val="official", **QUIET)


def test_voc_trainval_only_carves_stratified_val(tmp_path):
    exp = make_voc(tmp_path / "voc", n_train=30, n_val=10, n_test=4, trainval_only=True)
    exp = exp.reindex(sorted(exp.names))   # no --classes: the union of the object names
    m = shard("voc", tmp_path / "voc", tmp_path / "out", val_fraction=0.25, seed=3, **QUIET)
    verify_shards(tmp_path / "out", exp)
    assert m["classes_from"] == "data" and len(m["classes"]) < 20
    carved = m["val_carved"]
    assert carved["fraction"] == 0.25 and carved["seed"] == 3
    assert carved["val_samples"] == m["splits"]["val"]["num_samples"] == round(41 * 0.25)
    assert carved["train_samples"] == m["splits"]["train"]["num_samples"]
    assert carved["max_abs_rate_diff"] < 0.2  # stratified: per-class rates stay close
    test_keys = set((tmp_path / "out" / "test-keys.txt").read_text().split())
    assert test_keys == {k for k, s in exp.splits.items() if s == "test"}  # test untouched


def test_coco_maps_category_ids_and_drops_empty(tmp_path):
    exp = make_coco(tmp_path / "coco", bad=True)
    m = shard("coco", tmp_path / "coco", tmp_path / "out", max_reject_fraction=0.5,
              splits={"train": "annotations/instances_train2014.json",
                      "val": str(tmp_path / "coco/annotations/instances_val2014.json")}, **QUIET)
    verify_shards(tmp_path / "out", exp)
    assert m["classes"] == ["person", "car", "dog", "toothbrush"]  # category-id order
    assert m["rejects"]["by_reason"]["no labels"] == 1


def test_coco_keep_empty_and_images_dir_override(tmp_path):
    make_coco(tmp_path / "coco", n_train=4, n_val=3, bad=True)
    (tmp_path / "coco" / "train2014").rename(tmp_path / "imgs")
    m = shard("coco", tmp_path / "coco", tmp_path / "out", keep_empty=True,
              max_reject_fraction=0.9, images_dir={"train": str(tmp_path / "imgs")},
              splits={"train": "annotations/instances_train2014.json",
                      "test": "annotations/instances_val2014.json"}, **QUIET)
    assert "no labels" not in m["rejects"]["by_reason"]
    assert m["val_carved"] and set(m["splits"]) == {"train", "val", "test"}
    assert m["splits"]["train"]["num_samples"] + m["splits"]["val"]["num_samples"] == 4 + 5


def test_nuswide_dead_images_fail_then_pass_with_higher_fraction(tmp_path):
    exp = make_nuswide(tmp_path / "nus")
    with pytest.raises(ShardError, match="NUS-WIDE") as e:
        shard("nuswide", tmp_path / "nus", tmp_path / "out", **QUIET)
    assert "missing image" in str(e.value) and not (tmp_path / "out").exists()
    shard("nuswide", tmp_path / "nus", tmp_path / "out", max_reject_fraction=0.3, **QUIET)
    m = verify_shards(tmp_path / "out", exp)
    assert m["classes"] == ["animal", "beach", "sky", "water"] and m["val_carved"]


def test_csv_labels_column_classes_file_unknown_class_and_no_split(tmp_path):
    csv_path, exp = make_csv(tmp_path / "src", {"train": 20}, label_format="labels",
                             with_split=False)
    with open(csv_path, "a") as f:
        f.write("train_0000.jpg,c1\n")      # the same image twice
        f.write("odd.name.jpg,c1|zebra\n")  # a class not in --classes; a dotted file name
    Image.open(tmp_path / "src/train_0001.jpg").save(tmp_path / "src/odd.name.jpg")
    exp.reject("train_0000", "duplicate key")
    exp.reject("odd_name", "unknown class")
    (tmp_path / "classes.txt").write_text("c0\nc1\nc2\nc3\n")
    m = shard("csv", csv_path, tmp_path / "out", classes_file=tmp_path / "classes.txt",
              max_reject_fraction=0.2, val_fraction=0.2, **QUIET)
    verify_shards(tmp_path / "out", exp)
    assert m["val_carved"]["val_samples"] == 4 and "c0" in m["val_carved"]["val_positive"]


def test_keys_are_sanitised_and_unique(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["a.b.jpg", "a_b.jpg", "x y.jpg", "sub/dir.1/img.jpg"]
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (200, 10, 10)).save(src / n)
    rows = "".join(f"{n},1,0,{'train' if i < 3 else 'val'}\n" for i, n in enumerate(names))
    (src / "l.csv").write_text("path,a,b,split\n" + rows)
    shard("csv", src / "l.csv", tmp_path / "out", **QUIET)
    keys = sum(((tmp_path / "out" / f"{s}-keys.txt").read_text().split() for s in ("train", "val")),
               [])
    assert sorted(keys) == sorted(["a_b", "a_b-1", "x_y", "sub_dir_1_img"])
    assert sanitize_key("a" * 200) != sanitize_key("a" * 201) and len(sanitize_key("a" * 200)) <= 80


# --------------------------------------------------------------------------------------------
# malformed inputs fail with file and line

def test_malformed_xml_json_csv_name_file_and_line(tmp_path, capsys):
    make_voc(tmp_path / "voc", n_train=2, n_val=1, n_test=1, malformed=True)
    with pytest.raises(SourceError, match=r"Annotations/\d+\.xml:\d+:\d+: malformed XML"):
        shard("voc", tmp_path / "voc", tmp_path / "o1", **QUIET)
    make_coco(tmp_path / "coco", n_train=2, n_val=1, malformed=True)
    code = cli_main(["coco", str(tmp_path / "coco"), "--split",   # through the CLI: a clear message
                     "train=annotations/instances_train2014.json", "--out", str(tmp_path / "o2")])
    assert code == 2   # a user error
    assert "instances_train2014.json:" in capsys.readouterr().err
    csv_path, _ = make_csv(tmp_path / "csv", {"train": 3})
    with open(csv_path, "a") as f:
        f.write("extra.jpg,1,0,1,0,train,surplus\n")
    with pytest.raises(SourceError, match=r"labels\.csv:5: 7 fields"):
        shard("csv", csv_path, tmp_path / "o3", **QUIET)
    csv_path.write_text("image,c0,split\na.jpg,2,train\n")
    with pytest.raises(SourceError, match=r"labels\.csv:2: column 'c0' = '2'"):
        shard("csv", csv_path, tmp_path / "o4", **QUIET)
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4")) for p in tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# safety: overwrite, interruption, reject fraction

def test_overwrite_protection_and_interrupted_run(tmp_path, monkeypatch):
    csv_path, exp = make_csv(tmp_path / "src", {"train": 8, "val": 3})
    out = tmp_path / "out"
    shard("csv", csv_path, out, samples_per_shard=3, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardError, match="already exists; pass --overwrite"):
        shard("csv", csv_path, out, **QUIET)

    calls = []

    def interrupted(tar, idx):  # Ctrl-C while the second tar is being indexed
        calls.append(tar)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tar, idx)

    real = writer_mod.make_index
    monkeypatch.setattr(writer_mod, "make_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard("csv", csv_path, out, samples_per_shard=2, overwrite=True, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old output intact
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        shard("csv", csv_path, tmp_path / "fresh", samples_per_shard=2, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no tmp, no partial
    monkeypatch.setattr(writer_mod, "make_index", real)
    shard("csv", csv_path, out, samples_per_shard=2, overwrite=True, **QUIET)
    verify_shards(out, exp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_reject_fraction_failure_is_clear(tmp_path):
    csv_path, _ = make_csv(tmp_path / "src", {"train": 10, "val": 3}, bad=True)
    with pytest.raises(ShardError, match=r"max-reject-fraction=0\.05") as e:
        shard("csv", csv_path, tmp_path / "out", **QUIET)
    msg = str(e.value)
    assert "missing image" in msg and "raise --max-reject-fraction" in msg
    assert not (tmp_path / "out").exists()
    listed = (tmp_path / "out.rejects.jsonl").read_text().splitlines()
    assert listed and all(json.loads(x)["reason"] for x in listed)


# --------------------------------------------------------------------------------------------
# determinism, re-encoding, the shared fixture

def _tree(d: Path) -> dict:
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "manifest.json"}
    m = json.loads((d / "manifest.json").read_text())
    for k in ("args", "stats"):
        m.pop(k)
    return files, m


def test_workers_1_and_2_give_identical_output(tmp_path):
    csv_path, exp = make_csv(tmp_path / "src", {"train": 16, "val": 4, "test": 4}, bad=True,
                             image_size=(80, 60))
    common = dict(samples_per_shard=5, max_side=40, max_reject_fraction=0.5, seed=7, **QUIET)
    m1 = shard("csv", csv_path, tmp_path / "w1", workers=1, **common)
    m2 = shard("csv", csv_path, tmp_path / "w2", workers=2, **common)
    assert _tree(tmp_path / "w1") == _tree(tmp_path / "w2")
    assert m2["stats"]["workers"] == 2
    # max_side re-encodes every kept image to a longer side of 40 px
    assert m1["converted"]["count"] == len(exp.labels)
    verify_shards(tmp_path / "w1", exp, expect_converted=False)
    for s in read_webdataset(tmp_path / "w1", "train"):
        meta = json.loads(s["json"])
        assert max(meta["width"], meta["height"]) == 40
    # another seed shuffles train differently, other splits keep their order
    m3 = shard("csv", csv_path, tmp_path / "w3", **dict(common, seed=8))
    k1 = (tmp_path / "w1/train-keys.txt").read_text()
    assert k1 != (tmp_path / "w3/train-keys.txt").read_text()
    assert sorted(k1.split()) == sorted((tmp_path / "w3/train-keys.txt").read_text().split())
    assert (tmp_path / "w1/test-keys.txt").read_text() == (tmp_path / "w3/test-keys.txt").read_text()


def test_original_jpeg_bytes_kept_and_shard_size_limit(tmp_path):
    csv_path, _ = make_csv(tmp_path / "src", {"train": 12, "val": 2})
    m = shard("csv", csv_path, tmp_path / "out", shard_size_mb=0.008, **QUIET)  # ~3 samples
    for s in read_webdataset(tmp_path / "out", "train"):
        assert s["jpg"] == (tmp_path / "src" / json.loads(s["json"])["source"]).read_bytes()
    shards = m["splits"]["train"]["shards"]
    assert len(shards) >= 3 and sum(s["num_samples"] for s in shards) == 12
    for s in shards[:-1]:  # a tar is closed at the first sample past the limit
        assert 8000 <= (tmp_path / "out" / s["file"]).stat().st_size < 8000 + 20000


def test_build_small_shards_for_other_modules(tmp_path):
    out = build_small_shards(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    sizes = {s: [x["num_samples"] for x in v["shards"]] for s, v in m["splits"].items()}
    assert sizes == {"train": [7, 7, 7, 7, 7, 5], "val": [7, 5], "test": [7, 5]}
    assert sum(c["ignore"] for c in m["splits"]["train"]["label_counts"].values()) > 0
    ids, labels, shapes = read_dali(out, "val")
    assert list(ids) == list(range(12)) and labels.shape == (12, 4) and shapes[0] == (48, 64, 3)
    assert build_small_shards(tmp_path) == out  # cached


def test_exif_rotation_and_transparency_are_normalised(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored upright, width/height swapped
    Image.new("RGB", (40, 20), (0, 200, 0)).save(src / "rot.jpg", exif=exif)
    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(src / "clear.png")
    Image.new("RGB", (30, 20), (0, 0, 200)).save(src / "plain.jpg")
    (src / "l.csv").write_text("image,a,split\nrot.jpg,1,train\nclear.png,1,train\n"
                               "plain.jpg,1,val\n")
    m = shard("csv", src / "l.csv", tmp_path / "out", **QUIET)
    got = {s["__key__"]: s for s in read_webdataset(tmp_path / "out", "train")}
    assert Image.open(io.BytesIO(got["rot"]["jpg"])).size == (20, 40)
    assert Image.open(io.BytesIO(got["clear"]["jpg"])).getpixel((5, 5)) == (255, 255, 255)
    assert m["converted"]["by_reason"] == {"exif orientation": 1, "format PNG": 1, "mode RGBA": 1}


def test_carve_val_is_exact_disjoint_and_stratified():
    from mlic_dist.shard.split import carve_val

    rng = np.random.default_rng(0)
    labels = (rng.random((500, 6)) < [0.5, 0.2, 0.1, 0.05, 0.02, 0.3]).astype(np.int8)
    tr, va = carve_val(labels, 0.1, seed=1)
    assert len(va) == 50 and len(tr) == 450 and not set(tr) & set(va)
    assert np.abs(labels[tr].mean(0) - labels[va].mean(0)).max() < 0.03
    tr2, va2 = carve_val(labels, 0.1, seed=1)
    assert (va == va2).all()  # seeded
    with pytest.raises(ValueError, match="val-fraction"):
        carve_val(labels, 1.5, seed=0)


def test_bad_image_kinds_are_all_covered():
    assert set(BAD_IMAGES) == {"zero", "truncated", "notimage", "png", "gray", "cmyk", "palette"}


# --------------------------------------------------------------------------------------------
# layouts users have: labeling-tool VOC exports, COCO exports with other names

def test_voc_class_union_is_the_voc2007_order(tmp_path):
    from mlic_dist.shard.sources import read_source

    exp = make_voc(tmp_path / "voc", n_train=24, n_val=0, n_test=0, image_size=(8, 6),
                   classes_used=20, cover_all=True)
    assert exp.names == set(VOC_CLASSES)   # every class occurs, so the union is all 20
    ds = read_source("voc", tmp_path / "voc")
    assert ds.classes == list(VOC_CLASSES) and ds.classes_from == "data"  # the official order


@pytest.mark.parametrize("layout", ["default", "flat"])
def test_voc_export_with_its_own_classes(tmp_path, layout):
    names = ("vest", "helmet", "person", "boot")   # a labeling tool's names, not VOC's
    exp = make_voc(tmp_path / "voc", n_train=10, n_val=4, n_test=2, image_size=(24, 16),
                   classes=names, classes_used=4, layout=layout, png_every=4)
    assert exp.converted   # some images are ID.png, named by the XML's <filename>
    union = exp.reindex(sorted(exp.names))
    m = shard("voc", tmp_path / "voc", tmp_path / "out", **QUIET)
    verify_shards(tmp_path / "out", union)   # labels checked sample by sample, also through DALI
    assert m["classes"] == ["boot", "helmet", "person", "vest"] and m["classes_from"] == "data"
    assert m["val_carved"] and any(layout_word in " ".join(m["source_notes"])
                                   for layout_word in ("default.txt", "Annotations/*.xml"))
    # --classes: its order, and names outside it stay "unknown class" rejects
    with_boot = sorted(k for k, v in exp.labels.items() if v[names.index("boot")] != 0)
    assert with_boot
    m2 = shard("voc", tmp_path / "voc", tmp_path / "out2", max_reject_fraction=0.9,
               classes_file=write_classes(tmp_path / "c.txt", ["person", "helmet", "vest"]), **QUIET)
    assert m2["classes"] == ["person", "helmet", "vest"] and m2["classes_from"] == "file"
    rejects = [json.loads(x) for x in (tmp_path / "out2/rejects.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rejects if r["reason"] == "unknown class") == with_boot
    kept = {s["__key__"]: np.frombuffer(s["lbl"], np.int8) for split in m2["splits"]
            for s in read_webdataset(tmp_path / "out2", split)}
    assert set(kept) == set(exp.labels) - set(with_boot)
    for k, lbl in kept.items():
        np.testing.assert_array_equal(lbl, exp.reindex(["person", "helmet", "vest"]).labels[k])


@pytest.mark.parametrize("layout", ["roboflow", "flat"])
def test_coco_export_with_other_names_finds_its_images(tmp_path, layout):
    exp, splits = make_coco_export(tmp_path / "src", layout)
    m = shard("coco", tmp_path / "src", tmp_path / "out", splits=splits, **QUIET)
    verify_shards(tmp_path / "out", exp)
    assert m["classes"] == ["bolt", "gear", "nut"]   # Roboflow's placeholder "parts" is no class
    assert any("'parts'" in n for n in m["source_notes"]) == (layout == "roboflow")


def test_coco_images_not_found_names_the_places_tried(tmp_path):
    _, splits = make_coco_export(tmp_path / "src", "roboflow")
    (tmp_path / "src/train").rename(tmp_path / "elsewhere")
    (tmp_path / "src/train").mkdir()
    (tmp_path / "elsewhere/_annotations.coco.json").rename(tmp_path / "src/train/_annotations.coco.json")
    with pytest.raises(SourceError) as e:
        shard("coco", tmp_path / "src", tmp_path / "out", splits=splits, **QUIET)
    msg = str(e.value)
    assert "cannot find its images" in msg and "--images-dir train=DIR" in msg
    assert str(tmp_path / "src/train") in msg and str(tmp_path / "src") + "'" in msg
    m = shard("coco", tmp_path / "src", tmp_path / "out", splits=splits,   # the override still works
              images_dir={"train": str(tmp_path / "elsewhere")}, **QUIET)
    assert m["splits"]["train"]["num_samples"] == 8


# --------------------------------------------------------------------------------------------
# class-name typos

def test_typo_rule_flags_rare_and_lookalike_classes_only():
    from mlic_dist.shard.classes import typo_warnings

    w = typo_warnings({"cat": 300, "dog": 250, "cta": 1})
    assert [(x["class"], x["count"], x["similar_to"], x["similar_count"]) for x in w] == [
        ("cta", 1, "cat", 300)]
    assert "typo of 'cat'" in w[0]["message"] and "--classes FILE" in w[0]["message"]
    rare = typo_warnings({"a": 300, "b": 200, "c": 150, "zebra": 2})   # rare, no look-alike
    assert [(w["class"], w["similar_to"]) for w in rare] == [("zebra", None)]
    assert [w["class"] for w in typo_warnings({"Person": 1, "person": 60, "car": 3})] == ["Person"]
    # a normal long tail: the rarest class has 3 (> 2); a rare class next to a modest median
    assert typo_warnings({"cat": 300, "dog": 250, "bird": 3}) == []
    assert typo_warnings({"cat": 30, "dog": 25, "bird": 1}) == []


def test_csv_label_typo_is_warned_about(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rows = ["image,labels"]
    for i in range(60):
        Image.new("RGB", (8, 6), (i * 4, 0, 0)).save(src / f"p{i}.jpg")
        rows.append(f"p{i}.jpg,cat" + ("|dog" if i % 2 else ""))
    rows[-1] = "p59.jpg,cta"   # one typo
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "mlic_dist.shard", "csv", str(src / "labels.csv"), "--out",
           str(tmp_path / "out"), "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "'cta'" in warning[0] and "'cat'" in warning[0]
    assert "--classes FILE" in warning[0]
    assert "cat 59, cta 1, dog 29" in r.stdout   # the summary lists the positives per class
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [(w["class"], w["similar_to"]) for w in m["class_warnings"]] == [("cta", "cat")]
    # a normal dataset with names from its labels: no warning
    csv_path, _ = make_csv(tmp_path / "ok", {"train": 20, "val": 5}, label_format="labels")
    m = shard("csv", csv_path, tmp_path / "ok_out", progress=False)
    assert m["classes_from"] == "data" and m["class_warnings"] == []
    out = capsys.readouterr()
    assert "warning" not in out.err and "classes (positives, all splits)" in out.out


# --------------------------------------------------------------------------------------------
# user errors: one line, exit status 2, no traceback

def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    csv_path, _ = make_csv(tmp_path / "src", {"train": 4})
    cmd = [sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--out", str(tmp_path / "o"),
           "--classes", str(tmp_path / "no-such-classes.txt")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no-such-classes.txt" in r.stderr
    cases = [(["csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")], "missing.csv"),
             (["coco", str(tmp_path), "--split", "train=a.json", "--classes", str(csv_path),
               "--out", str(tmp_path / "o")], "--classes applies to csv and voc"),
             (["csv", str(csv_path), "--out", str(tmp_path / "o"), "--quality", "0"], "--quality=0")]
    for argv, words in cases:
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and words in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# python -m mlic_dist.shard verify

def run_verify(capsys, *argv) -> tuple[int, str]:
    code = cli_main(["verify", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_verify_clean_corrupt_and_truncated(tmp_path, capsys):
    import shutil

    clean = build_small_shards(tmp_path / "base")
    r = subprocess.run([sys.executable, "-m", "mlic_dist.shard", "verify", str(clean), "--decode"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr
    assert "64 sample(s) read, every image test-decoded" in r.stdout

    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    tar, key = garble_sample(bad, "train", shard=2, sample=3)
    other, key2 = garble_sample(bad, "val", shard=1, sample=0)
    code, out = run_verify(capsys, bad)   # without --decode: the hash, but no key
    assert code == 1 and f"{tar.name}: has a sha256 other" in out and key not in out
    code, out = run_verify(capsys, bad, "--decode")
    assert code == 1
    assert f"{tar.name}: sample {key!r} cannot be decoded as a JPEG" in out
    assert f"{other.name}: sample {key2!r} cannot be decoded as a JPEG" in out
    assert "4 problem(s) in 2 file(s)" in out   # each garbled tar: its hash and its sample
    code, out = run_verify(capsys, bad, "--decode", "--split", "val", "--workers", "2")
    assert code == 1 and key2 in out and key not in out

    short = tmp_path / "short"
    shutil.copytree(clean, short)
    truncate_shard(short / "train-000004.tar", 0.6)
    code, out = run_verify(capsys, short)
    assert code == 1 and "train-000004.tar: is " in out and "truncated" in out
    assert "train-000004.tar: holds" in out

    assert run_verify(capsys, tmp_path / "nope")[0] == 2
    assert run_verify(capsys, tmp_path / "base")[0] == 2        # no manifest.json: not shards
    code, out = run_verify(capsys, clean, "--split", "dev")
    assert code == 2 and "'dev'" in out and "Traceback" not in out


# --------------------------------------------------------------------------------------------
# relative paths, and the real cause when every input is rejected

@pytest.mark.parametrize("layout", ["roboflow", "flat"])
def test_coco_with_a_relative_root_finds_its_images(tmp_path, monkeypatch, layout):
    """The inferred image folder is already under ROOT: joining ROOT again gave ROOT/ROOT/..."""
    exp, splits = make_coco_export(tmp_path / "src", layout)
    monkeypatch.chdir(tmp_path)
    argv = ["coco", "src", "--out", "out", "--no-progress"]
    for split, ann in splits.items():
        argv += ["--split", f"{split}={ann}"]
    assert cli_main(argv) == 0
    verify_shards(tmp_path / "out", exp)


def _all_images_missing(kind: str, root: Path) -> tuple[Path, dict]:
    """A dataset of `kind` without a val split whose every image file is gone: (ROOT, options)."""
    if kind == "csv":
        csv_path, _ = make_csv(root, {"train": 8}, with_split=False)
        for p in root.iterdir():
            if p.suffix in (".jpg", ".png"):
                p.unlink()
        return csv_path, {}
    if kind == "voc":
        make_voc(root, layout="flat")
        for p in (root / "JPEGImages").iterdir():
            p.unlink()
        return root, {}
    if kind == "coco":
        _, splits = make_coco_export(root, "flat")
        (root.parent / "empty").mkdir()
        return root, {"splits": splits, "images_dir": {"all": str(root.parent / "empty")}}
    make_nuswide(root)
    for p in (root / "Flickr").rglob("*.jpg"):
        p.unlink()
    return root, {}


@pytest.mark.parametrize("kind", ["csv", "voc", "coco", "nuswide"])
def test_every_image_missing_reports_the_rejects_before_the_val_carve(tmp_path, kind):
    src, options = _all_images_missing(kind, tmp_path / "src")
    with pytest.raises(ShardError) as e:
        shard(kind, src, tmp_path / "out", **options, **QUIET)
    msg = str(e.value)
    assert "inputs rejected (100.0%)" in msg and "'missing image'" in msg, msg
    assert "no train samples" not in msg
    listed = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert listed and {r["reason"] for r in listed} <= {"missing image", "no labels"}
    # every reject allowed: the carve has nothing left and says how many were rejected, and why
    with pytest.raises(SourceError, match=r"no train samples .*inputs rejected, by reason .*missing image"):
        shard(kind, src, tmp_path / "out", max_reject_fraction=1.0, **options, **QUIET)
