"""`python -m mlic_dist.shard csv` on the label files of Wang, Jia & Breckon (tests/fixtures/wang2019:
rows copied unchanged from the authors' repository), with placeholder JPEGs: the two value
conventions, headerless files, extension-less ids, several split files in one call, and the
refusal of a file read in the wrong convention."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic_dist.data.labels import read_split_labels
from mlic_dist.data.manifest import read_manifest
from mlic_dist.shard.__main__ import main as cli_main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wang2019"
VOC_MEANING = {"1": 1, "-1": 0, "0": -1}      # the authors' VOC files: 1 / -1 / 0 = pos / neg / difficult


def rows(path: Path, header: bool = True) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        lines = [r for r in csv.reader(f) if r]
    return (lines[0], lines[1:]) if header else ([], lines)


def placeholder_jpegs(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (24, 16), (i % 251, 40, 90)).save(folder / name, quality=80)


def shard_labels(out: Path) -> dict[str, np.ndarray]:
    """{key: (C,) int8} over every split of the shards, read through the loaders' own reader."""
    found = {}
    for split in read_manifest(out).splits:
        keys, labels = read_split_labels(out, split)
        found.update(zip(keys, labels))
    return found


def run(capsys, argv) -> tuple[int, str]:
    code = cli_main([*argv, "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.err


@pytest.fixture
def voc(tmp_path, monkeypatch):
    """The issue's layout: VOC2007/{trainval,classification_test}.csv + VOCdevkit/VOC2007/JPEGImages."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "VOC2007", tmp_path / "VOC2007")
    ids = [r[0] for f in ("trainval.csv", "classification_test.csv") for r in rows(FIXTURES / "VOC2007" / f)[1]]
    placeholder_jpegs(tmp_path / "VOCdevkit/VOC2007/JPEGImages", [f"{i}.jpg" for i in ids])
    return tmp_path


def test_voc_convention_files_keep_every_positive_negative_and_difficult(voc, capsys):
    code, err = run(capsys, ["csv", "VOC2007/trainval.csv", "--split", "test=VOC2007/classification_test.csv",
                             "--images", "VOCdevkit/VOC2007/JPEGImages", "--csv-values", "voc",
                             "--out", "data/shards/voc2007"])
    assert code == 0, err
    out = voc / "data/shards/voc2007"
    m = read_manifest(out)
    header, train_rows = rows(FIXTURES / "VOC2007" / "trainval.csv")
    _, test_rows = rows(FIXTURES / "VOC2007" / "classification_test.csv")
    assert list(m.classes) == header[1:]
    found = shard_labels(out)
    expected = {r[0]: np.array([VOC_MEANING[v] for v in r[1:]], np.int8) for r in train_rows + test_rows}
    assert set(found) == set(expected)                      # every row, no reject
    for key, labels in expected.items():
        assert found[key].tolist() == labels.tolist(), key
    assert sum((v == -1).sum() for v in found.values()) >= 30   # the files' difficult entries survive
    test_keys, _ = read_split_labels(out, "test")
    assert sorted(test_keys) == sorted(r[0] for r in test_rows)
    assert m.splits["val"].num_samples == 20 and m.splits["train"].num_samples == 180   # carved from trainval
    notes = json.loads((out / "manifest.json").read_text())["source_notes"]
    assert "300 image paths without an extension resolved to the file beside them" in " ".join(notes)


def test_voc_file_without_the_flag_is_refused_not_misread(voc, capsys):
    code, err = run(capsys, ["csv", "VOC2007/trainval.csv", "--images", "VOCdevkit/VOC2007/JPEGImages",
                             "--out", "data/shards/voc2007"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: VOC2007/trainval.csv:") and "--csv-values voc" in err and "are -1" in err
    assert not (voc / "data/shards/voc2007").exists()
    # the split file is checked on its own: a default-convention train file beside it does not hide it
    with open(voc / "mixed.csv", "w") as f:
        f.write("name,a,b\n000005,1,0\n000007,0,1\n")
    code, err = run(capsys, ["csv", "mixed.csv", "--split", "test=VOC2007/classification_test.csv",
                             "--images", "VOCdevkit/VOC2007/JPEGImages", "--out", "o"])
    assert code == 2 and "classification_test.csv" in err


def coco_layout(tmp_path):
    (tmp_path / "MSCOCO").mkdir()
    train = FIXTURES / "MSCOCO" / "valAnnotation-rows1-150.csv"
    test = FIXTURES / "MSCOCO" / "valAnnotation-rows151-250.csv"
    shutil.copy(train, tmp_path / "MSCOCO" / "trainAnnotation.csv")
    shutil.copy(test, tmp_path / "MSCOCO" / "testAnnotation.csv")
    shutil.copy(FIXTURES / "MSCOCO" / "coco80.txt", tmp_path / "coco80.txt")
    placeholder_jpegs(tmp_path / "COCO/train2014", [r[0] for r in rows(train, header=False)[1]])
    placeholder_jpegs(tmp_path / "COCO/val2014", [r[0] for r in rows(test, header=False)[1]])
    return train, test


def test_headerless_coco_files_with_a_classes_file_and_per_split_image_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train, test = coco_layout(tmp_path)
    code, err = run(capsys, ["csv", "MSCOCO/trainAnnotation.csv", "--split", "test=MSCOCO/testAnnotation.csv",
                             "--no-header", "--classes", "coco80.txt", "--images", "COCO/train2014",
                             "--images-dir", "test=COCO/val2014", "--out", "data/shards/coco2014",
                             "--max-reject-fraction", "0.2"])
    assert code == 0, err
    out = tmp_path / "data/shards/coco2014"
    m = read_manifest(out)
    assert len(m.classes) == 80 and m.classes[0] == "person" and m.classes[-1] == "toothbrush"
    found = shard_labels(out)
    expected = {r[0][:-4]: np.array(r[1:], np.int8) for r in rows(train, False)[1] + rows(test, False)[1]}
    empty = {k for k, v in expected.items() if not v.any()}
    assert set(found) == set(expected) - empty              # label-less images are the only rejects
    for key in found:
        assert found[key].tolist() == expected[key].tolist(), key
    test_keys, _ = read_split_labels(out, "test")
    assert sorted(test_keys) == sorted(r[0][:-4] for r in rows(test, False)[1] if r[0][:-4] not in empty)
    # read as if it had a header, or in the VOC convention: refused, with the flag that fixes it
    code, err = run(capsys, ["csv", "MSCOCO/trainAnnotation.csv", "--images", "COCO/train2014", "--out", "o"])
    assert code == 2 and "--no-header --classes FILE" in err and "trainAnnotation.csv:1" in err
    code, err = run(capsys, ["csv", "MSCOCO/trainAnnotation.csv", "--no-header", "--classes", "coco80.txt",
                             "--csv-values", "voc", "--images", "COCO/train2014", "--out", "o"])
    assert code == 2 and "--csv-values default" in err and "are 0" in err
    code, err = run(capsys, ["csv", "MSCOCO/trainAnnotation.csv", "--no-header", "--out", "o"])
    assert code == 2 and "--no-header needs --classes FILE" in err
    assert not (tmp_path / "o").exists()


def test_default_convention_and_split_file_mistakes(tmp_path, monkeypatch, capsys):
    """1 / 0 / -1 stays positive / negative / ignore; a split file with its own split column or a
    bare --split FILE are named."""
    monkeypatch.chdir(tmp_path)
    placeholder_jpegs(tmp_path / "img", ["a.jpg", "b.png", "c.jpg", "d.jpg"])
    (tmp_path / "train.csv").write_text("path,x,y,z\na,1,0,-1\nb,0,1,0\nc,1,0,0\n")
    (tmp_path / "test.csv").write_text("path,x,y,z\nd.jpg,0,0,1\n")
    code, err = run(capsys, ["csv", "train.csv", "--split", "test=test.csv", "--images", "img", "--out", "s",
                             "--val-fraction", "0.34"])
    assert code == 0, err
    found = shard_labels(tmp_path / "s")
    assert found["a"].tolist() == [1, 0, -1] and found["b"].tolist() == [0, 1, 0] and found["d"].tolist() == [0, 0, 1]
    (tmp_path / "t2.csv").write_text("path,x,y,z,split\nd.jpg,0,0,1,test\n")
    for argv, words in ((["--split", "test=t2.csv"], "has a 'split' column"),
                        (["--split", "test.csv"], "expected SPLIT=FILE"),
                        (["--split", "train=test.csv"], "positional CSV is the train file")):
        code, err = run(capsys, ["csv", "train.csv", *argv, "--images", "img", "--out", "o"])
        assert code == 2 and words in err, err
