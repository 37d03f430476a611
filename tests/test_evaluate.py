"""`python -m mlic_dist.evaluate`: subprocess runs for the real entry point (json, table,
--run-dir, error exits), in-process `main()` for the remaining argument combinations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlic_dist import evaluate as cli
from mlic_dist import metrics

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle"]


def make_arrays(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(CLASSES))) < 0.3).astype(np.int8)
    targets[0] = 1
    targets[rng.random(targets.shape) < 0.1] = -1
    targets[0] = 1
    scores = (rng.random(targets.shape) * 0.6 + 0.4 * (targets == 1)).astype(np.float32)
    return scores, targets


@pytest.fixture
def arrays(tmp_path):
    scores, targets = make_arrays()
    np.save(tmp_path / "S.npy", scores)
    np.save(tmp_path / "T.npy", targets)
    (tmp_path / "names.json").write_text(json.dumps(CLASSES))
    return tmp_path, scores, targets


@pytest.fixture
def run_dir(tmp_path):
    """A training run's saved outputs, as mlic_dist.train writes them."""
    for split, seed in (("val", 1), ("test", 2)):
        scores, targets = make_arrays(seed=seed)
        np.save(tmp_path / f"scores_{split}.npy", scores)
        np.save(tmp_path / f"targets_{split}.npy", targets)
        (tmp_path / f"keys_{split}.txt").write_text("".join(f"k{i}\n" for i in range(len(scores))))
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    return tmp_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlic_dist.evaluate", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- subprocess
def test_json_output_equals_metrics_evaluate(arrays):
    d, scores, targets = arrays
    proc = run_cli("--scores", d / "S.npy", "--targets", d / "T.npy", "--classes",
                   d / "names.json", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(json.dumps(metrics.evaluate(scores, targets, CLASSES)))
    assert {"mAP", "eAP", "top3", "thresh", "per_class", "classes_without_positives"} <= set(result)
    assert [row["name"] for row in result["per_class"]] == CLASSES


def test_table_output_is_readable(arrays):
    d, scores, targets = arrays
    proc = run_cli("--scores", d / "S.npy", "--targets", d / "T.npy", "--classes", d / "names.json")
    assert proc.returncode == 0, proc.stderr
    result = metrics.evaluate(scores, targets, CLASSES)
    assert f"mAP {100 * result['mAP']:.2f}" in proc.stdout
    chance = metrics.nanmean(metrics.chance_average_precision(targets))   # ignore labels dropped
    assert result["chance_mAP"] == pytest.approx(chance)
    assert f"mAP {100 * result['mAP']:.2f} (chance {100 * chance:.2f})" in proc.stdout
    assert "top3 (no threshold)" in proc.stdout and "thresh (score >= 0.5)" in proc.stdout
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("rule"))
    assert header.split()[1:] == list(metrics.SUMMARY_KEYS)
    for name in CLASSES:
        assert any(line.startswith(name) for line in lines)


def test_run_dir_uses_its_thresholds(run_dir):
    val_s, val_t = np.load(run_dir / "scores_val.npy"), np.load(run_dir / "targets_val.npy")
    tuned = metrics.tune_thresholds(val_s, val_t)
    metrics.save_thresholds(run_dir / "thresholds.json", tuned, CLASSES)
    proc = run_cli("--run-dir", run_dir, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = metrics.evaluate(np.load(run_dir / "scores_test.npy"),
                                np.load(run_dir / "targets_test.npy"), CLASSES, thresholds=tuned)
    assert result == json.loads(json.dumps(expected))
    assert result["settings"]["threshold"] == "per-class"


def test_bad_input_exits_2_with_message(arrays):
    d = arrays[0]
    np.save(d / "T.npy", np.zeros((3, 5), np.int8))
    proc = run_cli("--scores", d / "S.npy", "--targets", d / "T.npy")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "scores shape (40, 5) != targets shape (3, 5)" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- in-process
def test_run_dir_without_thresholds_uses_half(run_dir, capsys):
    code, out, _ = run_main(capsys, "--run-dir", run_dir, "--split", "val", "--format", "json")
    assert code == 0
    result = json.loads(out)
    expected = metrics.evaluate(np.load(run_dir / "scores_val.npy"),
                                np.load(run_dir / "targets_val.npy"), CLASSES, threshold=0.5)
    assert result == json.loads(json.dumps(expected))


def test_explicit_threshold_overrides_run_thresholds(run_dir, capsys):
    metrics.save_thresholds(run_dir / "thresholds.json", [0.9] * 5, CLASSES)
    code, out, _ = run_main(capsys, "--run-dir", run_dir, "--threshold", "0.3", "--format", "json")
    assert code == 0 and json.loads(out)["settings"]["threshold"] == 0.3


def test_thresholds_file_and_top_k(arrays, capsys):
    d, scores, targets = arrays
    metrics.save_thresholds(d / "th.json", [0.2, 0.4, 0.6, 0.8, 0.5], CLASSES)
    code, out, err = run_main(capsys, "--scores", d / "S.npy", "--targets", d / "T.npy",
                              "--classes", d / "names.json", "--thresholds", d / "th.json",
                              "--top-k", "2", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert "top2" in result and "top3" not in result
    assert [row["threshold"] for row in result["per_class"]] == [0.2, 0.4, 0.6, 0.8, 0.5]
    code, out, _ = run_main(capsys, "--scores", d / "S.npy", "--targets", d / "T.npy",
                            "--classes", d / "names.json", "--thresholds", d / "th.json")
    assert code == 0 and "per-class thresholds" in out


def test_table_lists_classes_without_positives(arrays, capsys):
    d, scores, targets = arrays
    targets[:, 3] = np.where(targets[:, 3] == 1, 0, targets[:, 3])
    np.save(d / "T.npy", targets)
    code, out, _ = run_main(capsys, "--scores", d / "S.npy", "--targets", d / "T.npy",
                            "--classes", d / "names.json")
    assert code == 0 and "classes without positives" in out and "boat" in out.splitlines()[-1]
    assert "n/a" in next(line for line in out.splitlines() if line.startswith("boat"))


@pytest.mark.parametrize("break_it, message", [
    (lambda d: np.save(d / "S.npy", np.full((40, 5), np.nan, np.float32)), "(row 0, col 0) = nan"),
    (lambda d: np.save(d / "T.npy", np.full((40, 5), 3, np.int8)), "(row 0, col 0) = 3"),
])
def test_bad_values_exit_2_with_message(arrays, capsys, break_it, message):
    d = arrays[0]
    break_it(d)
    code, out, err = run_main(capsys, "--scores", d / "S.npy", "--targets", d / "T.npy")
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "9"], "k=9 must be an integer in 1..5"),
    (["--thresholds", "MISSING.json"], "does not exist"),
    (["--classes", "BADNAMES"], "4 class names for 5"),
    (["--classes", "NAMES", "--thresholds", "BADTH"], "unknown ['truck']"),
])
def test_argument_errors_exit_2(arrays, capsys, extra, message):
    d = arrays[0]
    (d / "bad_names.json").write_text(json.dumps(CLASSES[:4]))
    metrics.save_thresholds(d / "bad_th.json", [0.5] * 6, CLASSES + ["truck"])
    extra = [str(d / "MISSING.json") if e == "MISSING.json" else
             str(d / "bad_names.json") if e == "BADNAMES" else
             str(d / "bad_th.json") if e == "BADTH" else
             str(d / "names.json") if e == "NAMES" else e for e in extra]
    code, out, err = run_main(capsys, "--scores", d / "S.npy", "--targets", d / "T.npy", *extra)
    assert code == 2 and message in err and out == ""


def test_missing_files_and_bad_combinations_exit_2(run_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, "--run-dir", run_dir, "--split", "train")
    assert code == 2 and "no scores for split 'train'" in err and "scores_train.npy is missing" in err
    (run_dir / "keys_test.txt").write_text("only-one\n")
    code, _, err = run_main(capsys, "--run-dir", run_dir)
    assert code == 2 and "lists 1 keys but scores_test.npy has 40 rows" in err
    code, _, err = run_main(capsys, "--scores", run_dir / "scores_test.npy")
    assert code == 2 and "--scores needs --targets" in err
    code, _, err = run_main(capsys, "--run-dir", run_dir, "--targets", "x.npy")
    assert code == 2 and "drop --targets" in err
    (tmp_path / "junk.npy").write_text("not numpy")
    code, _, err = run_main(capsys, "--scores", tmp_path / "junk.npy", "--targets", "x.npy")
    assert code == 2 and "not a readable .npy" in err
