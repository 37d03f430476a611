"""mlic_dist.ensemble on REAL training runs (tests/ensemble_runs.py: tiny_cnn, sizes 32 / 40,
M1 / M2, two seeds, a real MLflow SQLite store with a parent "sweep" run), and greedy selection
against a brute-force reference."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ensemble_runs import EXPERIMENT, isolated_store, train_small_runs
import mlic_dist.ensemble.__main__ as ensemble_cli
from mlic_dist import metrics, rundir
from mlic_dist.ensemble import build as ensemble
from mlic_dist.ensemble.selection import greedy_select


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    return isolated_store(trained, tmp_path_factory.mktemp("ensemble-store"))


def copy_run(src, dst):
    """A run directory copy without checkpoints (what an ensemble reads)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "best_model.pt", "tracking.json"))
    return dst


def rewrite(run_dir, split, fn):
    """Replace a split's (scores, targets, keys) with fn(scores, targets, keys)."""
    s = rundir.load_run(run_dir).split(split)
    rundir.write_split(run_dir, split, *fn(s.scores, s.targets, s.keys))


def by_key(run_dir, split):
    s = rundir.load_run(run_dir).split(split)
    return {k: (s.scores[i], s.targets[i]) for i, k in enumerate(s.keys)}


def run_cli(argv, capsys):
    rc = ensemble_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fused_scores_are_the_row_mean_after_alignment_by_key(trained, tmp_path, capsys):
    a = trained.runs["m1-32-s0"]
    b = copy_run(trained.runs["m1-40-s0"], tmp_path / "shuffled")
    rng = np.random.default_rng(0)
    for split in ("val", "test"):   # the same samples, rows (and their keys) in another order
        rewrite(b, split, lambda s, t, k: (s[(p := rng.permutation(len(k)))], t[p], [k[i] for i in p]))
    out = tmp_path / "ens"
    rc, stdout, _ = run_cli(["--run-dirs", a, b, "--out", out, "--no-tracking"], capsys)
    assert rc == 0 and "manual" in stdout
    fused = rundir.load_run(out)
    assert fused.is_ensemble and fused.ensemble["kind"] == "manual"
    for split in ("val", "test"):
        ra, rb, ref = by_key(a, split), by_key(trained.runs["m1-40-s0"], split), fused.split(split)
        assert ref.keys == rundir.load_run(a).split(split).keys
        for i, key in enumerate(ref.keys):
            np.testing.assert_allclose(ref.scores[i], (ra[key][0] + rb[key][0]) / 2, atol=1e-6)
            np.testing.assert_array_equal(ref.targets[i], ra[key][1])
        positional = (rundir.load_run(a).split(split).scores + rundir.load_run(b).split(split).scores) / 2
        assert not np.allclose(positional, ref.scores, atol=1e-3)   # the shuffle mattered
    # thresholds tuned on the fused validation scores; metrics computed from the fused scores
    val = fused.split("val")
    np.testing.assert_allclose(fused.thresholds, metrics.tune_thresholds(val.scores, val.targets))
    test = fused.split("test")
    expected = metrics.evaluate(test.scores, test.targets, fused.classes, thresholds=fused.thresholds)
    assert fused.metrics["test"]["mAP"] == pytest.approx(expected["mAP"])
    assert fused.metrics["test"]["thresh"] == pytest.approx(expected["thresh"])
    for split in ("val", "test"):   # the chance level of the same labels, beside mAP and in the summary
        chance = metrics.nanmean(metrics.chance_average_precision(fused.split(split).targets))
        assert fused.metrics[split]["chance_mAP"] == pytest.approx(chance)
        assert f"{split} mAP {fused.metrics[split]['mAP']:.4f} (chance {chance:.4f})" in stdout
    # evaluate treats the ensemble directory like a run
    from mlic_dist import evaluate

    assert evaluate.main(["--run-dir", str(out), "--split", "test", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx(expected["mAP"])


def test_weights_give_the_weighted_mean(trained, tmp_path, capsys):
    a, b = trained.runs["m1-32-s0"], trained.runs["m2-32-s0"]
    rc, _, _ = run_cli(["--run-dirs", a, b, "--weights", "3", "1", "--name", "mine", "--out", tmp_path / "w",
                        "--no-tracking"], capsys)
    assert rc == 0
    fused = rundir.load_run(tmp_path / "w")
    assert fused.ensemble["name"] == "mine"
    ra, rb = by_key(a, "val"), by_key(b, "val")
    want = np.stack([(3 * ra[k][0] + rb[k][0]) / 4 for k in fused.split("val").keys])
    np.testing.assert_allclose(fused.split("val").scores, want, atol=1e-6)
    assert [m["weight"] for m in fused.ensemble["members"]] == [3.0, 1.0]


def test_members_that_do_not_match_are_one_line_errors(trained, tmp_path, capsys):
    a = trained.runs["m1-32-s0"]
    fewer = copy_run(trained.runs["m1-40-s0"], tmp_path / "fewer")
    dropped = rundir.load_run(fewer).split("val").keys[5]
    rewrite(fewer, "val", lambda s, t, k: (np.delete(s, 5, 0), np.delete(t, 5, 0), k[:5] + k[6:]))
    renamed = copy_run(trained.runs["m1-40-s0"], tmp_path / "renamed")
    classes = json.loads((renamed / "classes.json").read_text())
    thresholds = json.loads((renamed / "thresholds.json").read_text())
    (renamed / "classes.json").write_text(json.dumps(classes[:2] + ["dog"] + classes[3:]))
    thresholds["dog"] = thresholds.pop(classes[2])
    (renamed / "thresholds.json").write_text(json.dumps(thresholds))
    no_test = copy_run(trained.runs["m1-40-s0"], tmp_path / "no_test")
    for f in ("scores_test.npy", "targets_test.npy", "keys_test.txt"):
        (no_test / f).unlink()
    cases = [
        ([a, fewer], [f"key {dropped!r}", "m1-32-s0", "fewer", "val"]),
        ([a, renamed], ["different classes", f"{classes[2]!r} vs 'dog'", "renamed", "position 2"]),
        ([a, no_test], ["test scores", "no_test"]),
        ([a, fewer, "--weights", "1"], ["--weights has 1 values for 2"]),
        ([a, tmp_path / "absent"], ["does not exist"]),
    ]
    for argv, needles in cases:
        rc, _, err = run_cli(["--run-dirs", *argv, "--no-tracking", "--out", tmp_path / "x"], capsys)
        assert rc == 2, argv
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)
    assert not (tmp_path / "x").exists()
    # an ensemble is never a member
    run_cli(["--run-dirs", a, trained.runs["m1-40-s0"], "--out", tmp_path / "e", "--no-tracking"], capsys)
    rc, _, err = run_cli(["--run-dirs", a, tmp_path / "e", "--no-tracking"], capsys)
    assert rc == 2 and "never members" in err


def test_selection_and_thresholds_ignore_the_test_split(trained, tmp_path):
    runs = [trained.runs[n] for n in ("m1-32-s0", "m1-40-s0", "m2-32-s0", "m1-32-s1")]
    rng = np.random.default_rng(1)
    scrambled = []
    for r in runs:   # test scores permuted across samples (keys and labels left): test is now noise
        c = copy_run(r, tmp_path / "scrambled" / r.name)
        rewrite(c, "test", lambda s, t, k: (s[rng.permutation(len(k))], t, k))
        scrambled.append(c)
    built = [ensemble.build_ensemble([ensemble.member_from_dir(d) for d in dirs], "greedy", name="g",
                                     out=tmp_path / "ens" / tag, greedy_init=2, greedy_steps=4)
             for tag, dirs in (("clean", runs), ("scrambled", scrambled))]
    clean, noisy = built
    strip = lambda doc: [(m["name"], m["weight"]) for m in doc["members"]]  # noqa: E731
    assert strip(clean.ensemble) == strip(noisy.ensemble)
    assert clean.ensemble["greedy"]["trajectory"] == noisy.ensemble["greedy"]["trajectory"]
    np.testing.assert_array_equal(clean.thresholds, noisy.thresholds)
    assert clean.metrics["val"]["mAP"] == noisy.metrics["val"]["mAP"]
    assert not np.allclose(clean.split("test").scores, noisy.split("test").scores)


def reference_greedy(scores, targets, init, steps):
    """Brute force with sklearn AP: fused = the count-weighted mean, recomputed from scratch."""
    def value(counts):
        fused = sum(c * s.astype(np.float64) for c, s in zip(counts, scores)) / sum(counts)
        return metrics.mean_average_precision(fused.astype(np.float32), targets)

    m = len(scores)
    unit = np.eye(m, dtype=int)
    single = [value(unit[i]) for i in range(m)]
    order = sorted(range(m), key=lambda i: (-single[i], i))
    counts, path = np.zeros(m, int), []
    for i in order[:init]:
        counts = counts + unit[i]
        path.append((i, value(counts), counts.copy()))
    for _ in range(steps):
        values = [value(counts + unit[i]) for i in range(m)]
        best = max(range(m), key=lambda i: (round(values[i], 12), -i))
        counts = counts + unit[best]
        path.append((best, values[best], counts.copy()))
    best_point = max(range(len(path)), key=lambda t: (round(path[t][1], 12), -t))
    return path, best_point


def test_grouping_ignores_what_a_resume_may_change_except_the_training_length_and_data():
    """A member resumed with train.resume_accept (and another max_nonfinite_steps, resume path,
    loader) stays in its ScaleEn group: grouping and resume read one list (config.py)."""
    from mlic_dist.config import RESUME_FREE, flatten, load_config, to_dict
    from mlic_dist.ensemble.selection import find_groups

    base = flatten(to_dict(load_config(None, ["model.backbone=tiny_cnn"])))

    def groups(*changes):
        runs = [{**base, "data.size": 384 + 64 * i, **c} for i, c in enumerate(changes)]
        return find_groups(runs, "scale", lambda r: r, lambda r: 0, str)

    resumed = {"train.resume_accept": "optim.lr,optim.head_lr", "train.max_nonfinite_steps": 50,
               "train.resume": "runs/a/checkpoints/e0003-s0000000", "data.num_workers": 8}
    (g,) = groups({}, resumed, {"data.loader": "torch", "tracking.experiment": "other"})
    assert [r["data.size"] for r in g.items] == [384, 448, 512]
    assert groups({}, {"optim.lr": 0.5}) == [] and groups({}, {"seed": 1}) == []   # other models
    model_defining = {"train.epochs", "train.early_stopping", "data.shards"}
    for key in sorted(RESUME_FREE):
        assert bool(groups({}, {key: "changed"})) == (key not in model_defining), key


def test_greedy_matches_a_brute_force_reference():
    rng = np.random.default_rng(1)
    n, c, m = 90, 5, 6
    targets = (rng.random((n, c)) < 0.3).astype(np.int8)
    targets[rng.random((n, c)) < 0.05] = -1
    truth = (targets == 1).astype(float)
    # members see the truth through different amounts of noise: complementary errors
    scores = [np.clip(truth * 0.3 + rng.normal(0.35, 0.15 + 0.05 * j, (n, c)), 0, 1).astype(np.float32)
              for j in range(m)]
    got = greedy_select(scores, targets, init=2, steps=8)
    path, best = reference_greedy(scores, targets, init=2, steps=8)
    assert [p["added"] for p in got.trajectory] == [i for i, _, _ in path]
    np.testing.assert_allclose([p["val_mAP"] for p in got.trajectory], [v for _, v, _ in path], atol=1e-9)
    assert got.best_step == best
    np.testing.assert_array_equal(got.counts, path[best][2])
    assert (got.counts > 0).sum() >= 2 and got.counts.max() >= 2    # a real ensemble, with repeats
    assert got.best_step < len(got.trajectory) - 1                  # kept at its best point, not the end


def test_build_ensembles_logs_each_kind_in_mlflow(trained, store, tmp_path):
    client = MlflowClient(store)
    built = ensemble.build_ensembles(EXPERIMENT, ["all"], store, out_dir=tmp_path / "ens")
    soups = [r for r in built if not r.is_ensemble]   # "all" includes the weight soup (tests/test_soup.py)
    assert [r.metrics["kind"] for r in soups] == ["soup"]
    built = [r for r in built if r.is_ensemble]
    by_kind = {}
    for run in built:
        by_kind.setdefault(run.ensemble["kind"], []).append(run)
    assert sorted(by_kind) == ["distr", "greedy", "scale"] and all(len(v) == 1 for v in by_kind.values())
    members = {k: sorted(m["name"] for m in v[0].ensemble["members"]) for k, v in by_kind.items()}
    assert members["scale"] == ["m1-32-s0", "m1-40-s0"]        # differ only in data.size, same seed
    assert members["distr"] == ["m1-32-s0", "m2-32-s0"]        # differ only in data.augment
    greedy = by_kind["greedy"][0].ensemble["greedy"]
    assert sorted(c["name"] for c in greedy["candidates"]) == sorted(trained.runs)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    single = client.get_run(trained.run_ids["m1-32-s0"])
    # the same names as a training run's final metrics (an ensemble has no loss: no logits)
    final_names = {k for k in single.data.metrics if k.startswith(("final_val_", "test_")) and not k.endswith("_loss")}
    for run in built:
        info = client.get_run(run.tracking["run_id"])
        tags = info.data.tags
        assert info.info.status == "FINISHED" and tags["mlic.kind"] == "ensemble"
        assert tags["mlic.ensemble_kind"] == run.ensemble["kind"]
        assert tags["mlflow.parentRunId"] == trained.parent_run_id      # nested under the sweep
        ids = [trained.run_ids[m["name"]] for m in run.ensemble["members"]]
        assert tags["mlic.members"].split(",") == ids
        for i in ids:
            assert f"(#/experiments/{exp_id}/runs/{i})" in tags["mlflow.note.content"]
        assert set(info.data.metrics) == final_names
        assert info.data.metrics["test_mAP"] == pytest.approx(run.metrics["test"]["mAP"])
        assert info.data.metrics["final_val_top3_OF1"] == pytest.approx(run.metrics["val"]["top3"]["OF1"])
        assert {a.path for a in client.list_artifacts(info.info.run_id)} >= {"ensemble.json", "scores_val.npy"}
    # a rebuild updates the same runs (no twins) and never takes an ensemble as a member
    before = len(client.search_runs([exp_id]))
    again = ensemble.build_ensembles(EXPERIMENT, ["all"], store, out_dir=tmp_path / "ens")
    assert len(client.search_runs([exp_id])) == before
    assert sorted(r.tracking["run_id"] for r in again) == sorted(r.tracking["run_id"] for r in built + soups)
    again = [r for r in again if r.is_ensemble]
    assert all(not m["name"].startswith(("scale", "distr", "greedy")) for r in again for m in r.ensemble["members"])


def test_cli_select_under_an_explicit_parent_and_from_run_ids(trained, store, tmp_path, capsys):
    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = client.create_run(exp_id, tags={"mlflow.runName": "my-parent"}).info.run_id
    rc, out, err = run_cli(["--experiment", EXPERIMENT, "--select", "scale", "--tracking-uri", store,
                            "--out", tmp_path / "p"], capsys)
    assert rc == 0 and "scale" in out
    ids = [trained.run_ids["m1-32-s0"], trained.run_ids["m2-32-s0"]]
    rc, out, err = run_cli(["--runs", *ids, "--tracking-uri", store, "--parent-run-id", parent,
                            "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    run = rundir.load_run(tmp_path / "r")
    info = client.get_run(run.tracking["run_id"])
    assert info.data.tags["mlflow.parentRunId"] == parent and info.data.tags["mlic.ensemble_kind"] == "manual"
    assert info.data.tags["mlic.members"] == ",".join(ids)
    # the sweep's call with explicit run ids: only those runs, and never an ensemble
    pair = [trained.run_ids["m1-32-s0"], trained.run_ids["m1-40-s0"]]
    (scale,) = ensemble.build_ensembles(EXPERIMENT, ["scale", "distr"], store, out_dir=tmp_path / "ids", run_ids=pair)
    assert scale.ensemble["kind"] == "scale" and [m["run_id"] for m in scale.ensemble["members"]] == pair
    from mlic_dist.tracking.query import TrackingQueryError

    with pytest.raises(TrackingQueryError, match="'ensemble' run"):
        ensemble.build_ensembles(EXPERIMENT, ["greedy"], store, out_dir=tmp_path / "ids2",
                                 run_ids=[*pair, run.tracking["run_id"]])
    rc, _, err = run_cli(["--experiment", "nope", "--select", "all", "--tracking-uri", store], capsys)
    assert rc == 2 and "'nope' does not exist" in err
    rc, _, err = run_cli(["--select", "scale"], capsys)
    assert rc == 2 and "--experiment" in err


def test_a_dead_tracking_server_is_one_line_fast(free_port, capsys, monkeypatch):
    import time

    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
        monkeypatch.setenv(var, value)   # what the CLI sets; restored after the test
    start = time.time()
    rc, _, err = run_cli(["--experiment", "x", "--select", "all", "--tracking-uri", f"http://127.0.0.1:{free_port}"],
                         capsys)
    assert rc == 2 and err.startswith("error: cannot query MLflow at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1 and time.time() - start < 60


def _table3_groups(sweep_file, drop=()):
    """The ensembles a paper sweep file asks for, on the configs of its trials over two seeds
    (flattened as a run records them), less the trials in `drop`."""
    from pathlib import Path

    from mlic_dist.config import flatten, to_dict
    from mlic_dist.ensemble.selection import EnsembleRule, find_groups
    from mlic_dist.sweep.spec import load_sweep

    spec = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / sweep_file)
    runs = [{**flatten(to_dict(t.cfg)), "seed": seed} for t in spec.trials() for seed in (0, 1)]
    runs = [r for r in runs if (r["model.backbone"], r["data.size"], r["data.augment"]) not in drop]
    rules = [e for e in spec.ensembles if isinstance(e, EnsembleRule)]
    assert "greedy" in spec.ensembles
    found = set()
    for rule in rules:
        for g in find_groups(runs, rule.kind, lambda r: r, lambda r: 0, str, rule=rule):
            members = tuple(sorted((r["model.backbone"], r["data.size"], r["data.augment"]) for r in g.items))
            assert len({r["seed"] for r in g.items}) == 1 and g.name.startswith(rule.name + "-")
            found.add((rule.name, g.items[0]["seed"], members))
    return found


@pytest.mark.parametrize("sweep_file", ["voc2007.yaml", "coco2014.yaml", "nuswide.yaml"])
def test_paper_sweep_files_build_exactly_table_3(sweep_file):
    """ScaleEn = the three sizes of M3 (of M1 for ResNet-101 on VOC), DistrEn = M2 + M3 at 512 px,
    one of each per backbone and seed; nothing else, and no partial ScaleEn when a trial is lost."""
    sizes = (384, 448, 512)
    want = set()
    for seed in (0, 1):
        for b in ("resnet101", "vgg16"):
            aug = "M1" if (sweep_file, b) == ("voc2007.yaml", "resnet101") else "M3"
            want.add(("ScaleEn", seed, tuple(sorted((b, z, aug) for z in sizes))))
            want.add(("DistrEn", seed, ((b, 512, "M2"), (b, 512, "M3"))))
    assert _table3_groups(sweep_file) == want
    lost = _table3_groups(sweep_file, drop={("vgg16", 448, "M3")})
    assert lost == {w for w in want if not (w[0] == "ScaleEn" and w[2][0][0] == "vgg16")}


def test_a_rule_picks_the_members_names_the_ensemble_and_the_report_lists_them(trained, tmp_path, capsys):
    from mlic_dist.ensemble.selection import EnsembleRule
    from mlic_dist.report.tables import collect_from_dirs, ensemble_table

    distr = EnsembleRule.from_dict({"kind": "distr", "name": "DistrEn", "where": {"data.size": 32, "data.augment": ["M1", "M2"]}})
    partial = EnsembleRule.from_dict({"kind": "scale", "name": "ScaleEn", "where": {"data.size": [32, 40, 48]}})
    built = ensemble.build_ensembles(EXPERIMENT, [distr, partial], isolated_store(trained, tmp_path / "store"),
                                     out_dir=tmp_path / "ens",
                                     run_ids=list(trained.run_ids.values()))
    assert "ScaleEn[data.size=32|40|48]" in capsys.readouterr().out    # 32 + 40 only: not the rule's ScaleEn
    (run,) = built
    assert run.name.startswith("DistrEn-tiny_cnn-32px-seed0-")
    assert sorted(m["name"] for m in run.ensemble["members"]) == ["m1-32-s0", "m2-32-s0"]
    assert run.ensemble["group"]["values"] == ["M1", "M2"] and run.ensemble["group"]["rule"]["name"] == "DistrEn"
    rows = ensemble_table(collect_from_dirs([*trained.runs.values(), run.path]), "test")
    row = next(r for r in rows if r["method"].startswith("DistrEn"))
    assert row["method"] == "DistrEn (tiny_cnn, 32 px: M1 + M2)" and row["member runs"] == "m1-32-s0, m2-32-s0"
    with pytest.raises(ValueError, match="kind='greedy'"):
        EnsembleRule.from_dict({"kind": "greedy"})
