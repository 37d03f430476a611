"""mlic_dist/atomic.py: a bad --out (a path that cannot be created, the wrong kind of thing) stops
predict, export, ensemble and report at their start with one line naming the path (exit 2), before
they load a model or a run; and what they write is never left half-written (temporary files
removed, the previous version kept)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

import mlic_dist.ensemble.__main__ as ensemble_cli
import mlic_dist.export.__main__ as export_cli
import mlic_dist.report.__main__ as report_cli
from mlic_dist import predict, rundir
from mlic_dist.atomic import check_dir, check_file, replace_with, write_text
from mlic_dist.ensemble import build as ensemble
from mlic_dist.errors import UserError
from mlic_dist.export import formats as export
from mlic_dist.report import tables as report

UNCREATABLE = Path("/proc/nope/x")   # /proc takes no new files, not even from root


def test_check_file_and_check_dir_name_the_path_and_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for path, needle in ((tmp_path, "is a directory"), (UNCREATABLE, "cannot create files in /proc"),
                         (tmp_path / "a-file" / "x.onnx", "a-file is a file")):
        with pytest.raises(UserError, match=needle) as e:
            check_file(path, "--out", example="model.onnx")
        assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
    for path, needle in ((tmp_path / "a-file", "is a file, and a directory"),
                         (UNCREATABLE, "cannot create files in /proc")):
        with pytest.raises(UserError, match=needle):
            check_dir(path, "--out")
    with pytest.raises(ValueError, match="cannot create"):   # the caller's own error class
        check_file(UNCREATABLE, "--out", ValueError)
    # good destinations pass and nothing is created (no probe file stays behind either)
    before = sorted(tmp_path.rglob("*"))
    assert check_file(tmp_path / "new" / "deeper" / "m.pt") == tmp_path / "new" / "deeper" / "m.pt"
    check_file(tmp_path / "a-file")       # an existing file is replaced
    check_dir(tmp_path / "new-dir" / "sub")
    check_dir(tmp_path)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_replace_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "scores_val.npy"
    write_text(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with replace_with(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp != target
            tmp.write_text("half of the new")
            raise OSError(28, "disk full")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with replace_with(target) as tmp:
        np.save(tmp, np.arange(3))                    # np.save keeps a .npy name as it is
    assert np.load(target).tolist() == [0, 1, 2] and sorted(tmp_path.iterdir()) == [target]


def test_atomic_replaces_have_one_owner():
    """Every file the package replaces goes through mlic_dist/atomic.py: no other module renames."""
    import ast

    root = Path(__file__).resolve().parents[1] / "mlic_dist"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "os":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("replace", "rename") and not node.args[1:] and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("tmp", "path", "out"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} (Path.{node.func.attr})")
    assert offenders == [str(p) for p in offenders if p.startswith("atomic.py")], offenders


def _work_started(*args, **kwargs):
    raise AssertionError("the command started working before it checked --out")


def _cases(tmp_path: Path, monkeypatch) -> dict:
    """cli -> (main, argv before --out, the kind it writes); their work functions fail the test."""
    monkeypatch.setattr(predict, "find_images", _work_started)
    monkeypatch.setattr(predict, "Predictor", _work_started)
    monkeypatch.setattr(export, "load", _work_started)
    monkeypatch.setattr(ensemble_cli, "member_from_dir", _work_started)
    monkeypatch.setattr(report_cli, "collect_from_dirs", _work_started)
    run = tmp_path / "some-run"
    return {"predict": (predict.main, ["--run-dir", run, tmp_path / "img.jpg"], "file"),
            "export": (export_cli.main, ["--run-dir", run, "--format", "torchscript"], "file"),
            "ensemble": (ensemble_cli.main, ["--run-dirs", run, run, "--no-tracking"], "dir"),
            "report": (report_cli.main, ["--run-dirs", run], "dir")}


@pytest.mark.parametrize("cli", ["predict", "export", "ensemble", "report"])
@pytest.mark.parametrize("bad", ["uncreatable", "wrong kind"])
def test_a_bad_out_stops_the_cli_before_any_work(cli, bad, tmp_path, monkeypatch, capsys):
    main, argv, kind = _cases(tmp_path, monkeypatch)[cli]
    wrong = tmp_path / "exists"
    if kind == "file":
        wrong.mkdir()                  # a directory where a file is wanted
    else:
        wrong.write_text("not a directory")
    out = UNCREATABLE if bad == "uncreatable" else wrong
    assert main([str(a) for a in argv + ["--out", out]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert ("cannot create files in /proc" if bad == "uncreatable" else
            "is a directory" if kind == "file" else "is a file") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]     # nothing written


def test_an_interrupted_predict_leaves_no_partial_output(tmp_path, monkeypatch):
    """The records stream into a temporary file: a failure half-way removes it, and an older
    --out file stays as it was."""
    (tmp_path / "a.png").write_bytes(b"x")
    monkeypatch.setattr(predict, "Predictor", lambda *a: types.SimpleNamespace(classes=["cat"], members=[]))

    def two_records_then_fail(*args, **kwargs):
        yield {"file": "a.png", "labels": [], "top_k": [], "scores": {"cat": 0.1}}
        yield {"file": "a.png", "labels": [], "top_k": [], "scores": {"cat": 0.1}}
        raise RuntimeError("the device went away")

    monkeypatch.setattr(predict, "predict_files", two_records_then_fail)
    out = tmp_path / "preds.jsonl"
    out.write_text("the previous predictions\n")
    with pytest.raises(RuntimeError, match="went away"):
        predict.main(["--run-dir", str(tmp_path), str(tmp_path / "a.png"), "--out", str(out)])
    assert out.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "preds.jsonl"]


def test_a_failed_ensemble_write_keeps_the_previous_build_and_no_temporary(tmp_path, monkeypatch):
    keys = ["k0", "k1", "k2"]
    targets = np.array([[1, 0], [0, 1], [1, 1]], np.int8)
    split = ensemble.AlignedSplit(keys, targets, [np.full((3, 2), 0.5, np.float32)])
    args = (["a", "b"], {"val": split}, {"val": np.full((3, 2), 0.5, np.float32)}, np.array([0.5, 0.5]),
            {"kind": "ensemble"})
    out = tmp_path / "ens"
    ensemble._write_dir(out, *args, {"kind": "manual", "members": [], "build": 1})
    monkeypatch.setattr(rundir, "write_metrics", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        ensemble._write_dir(out, *args, {"kind": "manual", "members": [], "build": 2})
    assert json.loads((out / rundir.ENSEMBLE).read_text())["build"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_a_failed_report_table_leaves_no_temporary(tmp_path):
    with pytest.raises(ValueError, match="not in fieldnames"):
        report.write_csv(tmp_path / "t.csv", [{"a": 1}, {"b": 2}])   # a row with a column the header lacks
    assert list(tmp_path.iterdir()) == []
