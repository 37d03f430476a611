"""mlic_dist.report on REAL runs and ensembles (tests/ensemble_runs.py) in a real MLflow SQLite
store, and the whole chain (train -> ensemble -> report) against a real `mlflow server` over HTTP."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ensemble_runs import EXPERIMENT, isolated_store, overrides, train_small_runs
import mlic_dist.report.__main__ as report_cli
from mlic_dist import metrics, rundir
from mlic_dist.ensemble import build as ensemble
from mlic_dist.report import tables as report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory):
    """The store copy with every ensemble of the experiment, and the report built from it."""
    tmp = tmp_path_factory.mktemp("report")
    store = isolated_store(trained, tmp)
    ensembles = ensemble.build_ensembles(EXPERIMENT, ["all"], store, out_dir=tmp / "ensembles")
    # "all" also builds a weight soup: a single model, kept out of the single-model table's config
    # groups (test_single_model_table_has_every_run_... sees each training run once, not the soup)
    assert [e.metrics["kind"] for e in ensembles if not e.is_ensemble] == ["soup"]
    rep = report.build_report(EXPERIMENT, store, tmp / "report")
    return store, ensembles, rep, tmp / "report"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_single_model_table_has_every_run_and_the_papers_columns(trained, built):
    _, _, rep, out = built
    rows = read_csv(out / "single_models.csv")
    runs = {name: rundir.load_run(d) for name, d in trained.runs.items()}
    listed = [name for r in rows for name in r["runs"].split(", ")]
    assert sorted(listed) == sorted(runs)                       # every run, once
    by_cfg = {(r["augment"], int(r["size"])): r for r in rows}
    assert set(by_cfg) == {("M1", 32), ("M1", 40), ("M2", 32)}
    seeds = by_cfg[("M1", 32)]                                   # two seeds: mean +- std (n)
    assert seeds["n"] == "2"
    values = [runs[n].metrics["test"]["mAP"] for n in ("m1-32-s0", "m1-32-s1")]
    assert float(seeds["test_mAP"]) == pytest.approx(np.mean(values))
    assert float(seeds["test_mAP_std"]) == pytest.approx(np.std(values, ddof=1))
    assert f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f} (2)" in rep.markdown
    for r in rows:   # the chance column: random scores' expected mAP on the same test labels
        targets = np.load(trained.runs[r["runs"].split(", ")[0]] / "targets_test.npy")
        chance = metrics.nanmean(metrics.chance_average_precision(targets))
        assert float(r["test_chance_mAP"]) == pytest.approx(chance) and 0 < chance < 1
    header = next(line for line in rep.markdown.splitlines() if line.startswith("| backbone"))
    assert "| mAP | chance mAP |" in header
    one = by_cfg[("M1", 40)]
    top3 = runs["m1-40-s0"].metrics["test"]["top3"]
    assert float(one["test_top3_CF1_mean"]) == pytest.approx(top3["CF1_mean"])      # L-F1 = mean per-class F1
    harmonic = 2 * top3["CP"] * top3["CR"] / (top3["CP"] + top3["CR"])
    assert abs(top3["CF1_mean"] - harmonic) > 1e-3                                     # ... which is not this
    assert float(one["test_thresh_OF1"]) == pytest.approx(runs["m1-40-s0"].metrics["test"]["thresh"]["OF1"])
    assert "L-F1: mean over classes of per-class F1" in rep.markdown


def test_ensemble_table_compares_with_the_single_best_chosen_on_validation(trained, built):
    _, ensembles, rep, out = built
    rows = read_csv(out / "ensembles.csv")
    runs = {name: rundir.load_run(d) for name, d in trained.runs.items()}
    cfg_val = {}
    for name, r in runs.items():
        cfg_val.setdefault((r.config["data"]["augment"], r.config["data"]["size"]), []).append(r.metrics["val"]["mAP"])
    best_cfg = max(cfg_val, key=lambda k: np.mean(cfg_val[k]))
    assert rows[0]["method"].startswith("Single best (val)") and f"{best_cfg[0]} {best_cfg[1]} px" in rows[0]["method"]
    base = float(rows[0]["test_mAP"])
    ensembles = [e for e in ensembles if e.is_ensemble]   # the soup is a single model (tests/test_soup.py)
    assert sorted(r["runs"] for r in rows[1:]) == sorted(e.name for e in ensembles)   # a row per ensemble
    for r in rows[1:]:
        e = next(e for e in ensembles if e.name == r["runs"])
        assert float(r["test_mAP"]) == pytest.approx(e.metrics["test"]["mAP"])
        assert float(r["final_val_mAP"]) == pytest.approx(e.metrics["val"]["mAP"])
        assert r["beats_single_best"] == ("yes" if e.metrics["test"]["mAP"] > base else "no")
        assert float(r["delta_test_mAP"]) == pytest.approx(e.metrics["test"]["mAP"] - base)
        chance = metrics.nanmean(metrics.chance_average_precision(e.split("test").targets))
        assert e.metrics["test"]["chance_mAP"] == pytest.approx(chance)          # ensembles carry it
        assert float(r["test_chance_mAP"]) == pytest.approx(chance)
    assert {"ScaleEn (tiny_cnn, M1: 32/40 px)", "DistrEn (tiny_cnn, 32 px: M1 + M2)"} <= {r["method"] for r in rows}


def test_calibration_tables_and_plots(trained, built):
    store, ensembles, rep, out = built
    summary = read_csv(out / "calibration_summary.csv")
    assert sorted(r["run"] for r in summary) == sorted([*trained.runs, *(e.name for e in ensembles)])
    run = rundir.load_run(trained.runs["m2-32-s0"])
    test = run.split("test")
    at_half = metrics.evaluate(test.scores, test.targets, run.classes, threshold=0.5)["per_class"]
    per_class = read_csv(out / "calibration-m2-32-s0.csv")
    for c, row in enumerate(per_class):
        assert row["class"] == run.classes[c]
        assert float(row["threshold"]) == pytest.approx(run.thresholds[c])
        assert float(row["val F1"]) == pytest.approx(run.metrics["val"]["per_class"][c]["F1"])
        assert float(row["test F1 (tuned)"]) == pytest.approx(run.metrics["test"]["per_class"][c]["F1"])
        assert float(row["test F1 (0.5)"]) == pytest.approx(at_half[c]["F1"])
    from matplotlib.image import imread

    pngs = {p.name for p in rep.paths if p.suffix == ".png"}
    assert pngs == {"per_class_ap.png", "pr_curves.png", "training_curves.png", "ensemble_members.png"}
    for name in pngs:
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
        assert f"![{name[:-4]}]({name})" in rep.markdown
    # logged as its own report run, never mistaken for a training run or an ensemble
    client = MlflowClient(store)
    info = client.get_run(rep.run_id)
    assert info.data.tags["mlic.kind"] == "report"
    assert {a.path for a in client.list_artifacts(rep.run_id)} >= {"report.md", "ensembles.csv", *pngs}
    assert ensemble.build_ensembles(EXPERIMENT, ["scale"], store, out_dir=out.parent / "ensembles")  # still fine


def test_cli_from_run_dirs_without_mlflow(trained, built, tmp_path, capsys):
    _, ensembles, _, _ = built
    dirs = [str(trained.runs["m1-32-s0"]), str(trained.runs["m1-40-s0"]), str(ensembles[0].path)]
    assert report_cli.main(["--run-dirs", *dirs, "--out", str(tmp_path / "r"), "--speed-images", "4"]) == 0
    out = capsys.readouterr().out
    one_model = read_csv(tmp_path / "r" / "one_model.csv")   # predict timed on 4 validation images per row
    assert len(one_model) == 2 and all(float(r["images/s"]) > 0 for r in one_model)
    assert "Single best (val)" in out and ensembles[0].name in out
    assert (tmp_path / "r" / "report.md").is_file() and not (tmp_path / "r" / "tracking.json").exists()
    assert report_cli.main(["--run-dirs", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_train_ensemble_report_against_a_real_mlflow_server(trained, tmp_path):
    """Two trainings, an ensemble and a report, all talking HTTP to one `mlflow server`."""
    from mlic_dist.config import load_config
    from mlic_dist.tracking.server import MlflowServer
    from mlic_dist.train.loop import train

    with MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", artifacts=tmp_path / "artifacts",
                      log_file=tmp_path / "server.log") as server:
        for size in (32, 40):
            train(load_config(None, overrides(trained.shards, tmp_path / f"run{size}", server.uri, size, "M1", 0,
                                              None, epochs=1, experiment="http")))
        # the sweep's call, then the report CLI in its own process
        (built,) = ensemble.build_ensembles("http", ["scale"], server.uri, out_dir=tmp_path / "ens")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}", "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "mlic_dist.report", "--experiment", "http", "--out",
                            str(tmp_path / "rep"), "--tracking-uri", server.uri], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "ScaleEn (tiny_cnn, M1: 32/40 px)" in p.stdout and built.name in p.stdout   # the printed table
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("http").experiment_id])
        kinds = sorted(r.data.tags.get("mlic.kind", "single") for r in runs)
        assert kinds == ["ensemble", "report", "single", "single"]
        ens = next(r for r in runs if r.data.tags.get("mlic.kind") == "ensemble")
        assert ens.data.tags["mlic.ensemble_kind"] == "scale" and "test_mAP" in ens.data.metrics
        rep = next(r for r in runs if r.data.tags.get("mlic.kind") == "report")
        assert {a.path for a in client.list_artifacts(rep.info.run_id)} >= {"report.md", "pr_curves.png"}
        assert ens.info.run_id == built.tracking["run_id"]
        assert sorted(m["name"] for m in built.ensemble["members"]) == ["run32", "run40"]
    assert server.proc is None


def test_one_model_table_compares_soup_tta_and_ensembles_with_the_best_single(trained, built, tmp_path):
    """Issue 23's table: the best single (val), every ensemble, the soup and a TTA of the best
    single, with forward passes, predict's measured images/s and the share of the reference
    ensemble's test gain each keeps, all recomputed here from the directories' own metrics."""
    from mlic_dist.ensemble.tta import build_tta, parse_spec
    from mlic_dist.tracking.query import finished_run

    _, ensembles, _, _ = built
    singles = [finished_run(d) for d in trained.runs.values()]
    groups = report.single_groups(singles)
    best = report._best(groups[report.best_single_key(groups)])
    tta = build_tta(ensemble.member_from_dir(best.run.path), parse_spec("flip"), out=tmp_path / "tta")
    entries = singles + [finished_run(e.path) for e in ensembles] + [finished_run(tta.path)]
    rep = report.write_report(entries, tmp_path / "rep", "one model", speed_images=6)
    rows = rep.tables["one_model"]
    assert rows[0]["model"] == f"Single best (val): {best.name}" and rows[0]["forward passes"] == 1
    by_name = {e.name: e for e in entries}
    kinds = [r["kind"] for r in rows]
    assert {"ScaleEn", "Greedy selection", "TTA", "Weight soup"} <= set(kinds), kinds
    assert len(rows) == 1 + len(ensembles) + 1          # every ensemble and soup, the TTA, once each
    fused = [e for e in entries if e.is_ensemble and e.run.ensemble["kind"] in report.FUSED]
    ref = max(fused, key=lambda e: e.run.metrics["val"]["mAP"])
    base = best.run.metrics["test"]["mAP"]
    gain = ref.run.metrics["test"]["mAP"] - base
    for r in rows[1:]:
        e = by_name[r["model"]]
        assert r["test mAP"] == pytest.approx(e.run.metrics["test"]["mAP"])
        assert r["forward passes"] == (2 if r["kind"] == "TTA" else 1 if r["kind"] == "Weight soup"
                                       else len(e.run.ensemble["members"]))
        if e is ref:
            assert r["gain kept"] == "100% (reference)"
        elif gain > 0:
            assert r["gain kept"] == f"{(e.run.metrics['test']['mAP'] - base) / gain:.0%}"
        assert float(r["images/s"]) > 0
    assert "## The ensemble at one model's cost" in rep.markdown
    assert (tmp_path / "rep" / "one_model.csv").is_file()
