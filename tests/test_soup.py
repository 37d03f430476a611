"""The greedy weight soup (mlic_dist/ensemble/soup.py) on REAL training runs (tests/ensemble_runs.py:
tiny_cnn from seed 0 at 32 / 40 px and M1 / M2, a seed-1 run; a real MLflow SQLite store), plus
two constructed ingredients: an exact copy of the best run (averaging it changes nothing: kept)
and a copy whose weights are noise (averaging it ruins the soup: rejected)."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ensemble_runs import EXPERIMENT, isolated_store, train_small_runs
import mlic_dist.ensemble.__main__ as ensemble_cli
from mlic_dist import metrics, rundir
from mlic_dist.data import build_loader
from mlic_dist.ensemble import soup as soup_mod
from mlic_dist.ensemble.members import member_from_dir
from mlic_dist.models import create_model
from mlic_dist.predict import Predictor
from mlic_dist.sweep.spec import SweepError, load_sweep

SEED0 = ("m1-32-s0", "m1-40-s0", "m2-32-s0")
BN_STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


def _copy(src: Path, dst: Path, val_map: float, weights=None) -> Path:
    """A run directory copy recording `val_map` (its place in the soup's order), optionally
    with other weights in best_model.pt."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tracking.json"))
    m = json.loads((dst / rundir.METRICS).read_text())
    m["val"]["mAP"] = val_map
    (dst / rundir.METRICS).write_text(json.dumps(m))
    if weights is not None:
        torch.save(weights, dst / rundir.BEST_MODEL)
    return dst


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory):
    """A soup of the three seed-0 runs, a duplicate of the best one and a noise-weighted copy."""
    base = tmp_path_factory.mktemp("soup")
    members = [member_from_dir(trained.runs[n]) for n in SEED0]
    best = max(members, key=soup_mod.recorded_val_map)
    top = soup_mod.recorded_val_map(best)
    dup = _copy(best.run.path, base / "dup", top - 1e-9)           # tried right after the best
    gen = torch.Generator().manual_seed(0)
    noise = {k: (torch.randn(v.shape, generator=gen) * 50 if v.is_floating_point() else v)
             for k, v in soup_mod.load_weights(best).items()}
    poison = _copy(best.run.path, base / "poison", 0.0, noise)     # tried last
    members += [member_from_dir(dup), member_from_dir(poison)]
    (group,) = soup_mod.find_soup_groups(members)
    out = soup_mod.build_soup(group, out=base / "out" / group.name, bn_limit=2)
    return {"out": out.path, "group": group, "best": best, "dup": dup, "poison": poison, "doc":
            json.loads((out.path / rundir.SOUP).read_text())}


def test_greedy_keeps_what_does_not_lower_val_map_and_rejects_what_does(built):
    doc = built["doc"]
    ing = doc["ingredients"]
    names = [i["name"] for i in ing]
    assert names[0] == built["best"].name and names[1] == "dup" and names[-1] == "poison"
    assert [i["val_mAP"] for i in ing] == sorted((i["val_mAP"] for i in ing), reverse=True)
    by = {i["name"]: i for i in ing}
    assert by["dup"]["kept"] and by["dup"]["tried_val_mAP"] == ing[0]["soup_val_mAP"]
    assert not by["poison"]["kept"] and by["poison"]["tried_val_mAP"] < ing[-2]["soup_val_mAP"] - 0.1
    current = ing[0]["soup_val_mAP"]
    for i in ing[1:]:   # the rule, try by try: kept exactly when the soup's val mAP does not drop
        assert i["kept"] == (i["tried_val_mAP"] >= current)
        current = i["tried_val_mAP"] if i["kept"] else current
        assert i["soup_val_mAP"] == current
    run = rundir.load_run(built["out"])
    val = run.split("val")
    assert run.metrics["kind"] == "soup" and run.metrics["forward_passes"] == 1
    assert run.metrics["val"]["mAP"] == pytest.approx(metrics.mean_average_precision(val.scores, val.targets))
    assert doc["soup_val_mAP"] == pytest.approx(current)
    assert run.metrics["num_ingredients"] == sum(i["kept"] for i in ing)
    assert "test" in run.metrics and run.split("test").scores.shape == (12, 4)
    np.testing.assert_allclose(run.thresholds, metrics.tune_thresholds(val.scores, val.targets))
    cfg = yaml.safe_load((built["out"] / rundir.CONFIG).read_text())
    best_cfg = built["best"].run.config
    assert cfg["data"] == best_cfg["data"] and cfg["model"] == best_cfg["model"]
    assert cfg["train"]["output_dir"] == str(built["out"].resolve())


def test_best_model_is_the_average_with_bn_statistics_recomputed(built):
    doc = built["doc"]
    kept = [Path(i["run_dir"]) for i in doc["ingredients"] if i["kept"]]
    assert len(kept) >= 2
    sds = [torch.load(d / rundir.BEST_MODEL, weights_only=True) for d in kept]
    soup_sd = torch.load(built["out"] / rundir.BEST_MODEL, weights_only=True)
    plain = {k: torch.stack([sd[k].double() for sd in sds]).mean(0).float() if v.is_floating_point() else v
             for k, v in sds[0].items()}
    stats = [k for k in soup_sd if k.endswith(BN_STATS)]
    assert stats
    for k, v in soup_sd.items():
        if not k.endswith(BN_STATS + ("num_batches_tracked",)):
            torch.testing.assert_close(v, plain[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(soup_sd[k], plain[k], atol=1e-4) for k in stats)
    # torch's own update_bn on the same batches (the first 2 of the training split, eval transform)
    run = rundir.load_run(built["out"], splits=())
    cfg = run.cfg()
    model = create_model(cfg.model.backbone, len(run.classes), pretrained="none")
    model.load_state_dict(plain)
    loader = build_loader(cfg.data, cfg.data.train_split, train=False, seed=cfg.seed)
    torch.optim.swa_utils.update_bn([b.images[b.ids >= 0] for b in islice(loader, 2)], model)
    for k in stats:
        torch.testing.assert_close(soup_sd[k], model.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_groups_share_an_initialisation(trained):
    members = [member_from_dir(p) for p in trained.runs.values()]
    groups = {g.name: [m.name for m in g.items] for g in soup_mod.find_soup_groups(members)}
    assert sorted(map(sorted, groups.values())) == [["m1-32-s0", "m1-40-s0", "m2-32-s0"], ["m1-32-s1"]]

    def edited(m, **keys):   # the member with other config values (dotted keys)
        cfg = copy.deepcopy(m.run.config)
        for key, value in keys.items():
            section, name = key.split(".")
            cfg[section][name] = value
        return dataclasses.replace(m, run=dataclasses.replace(m.run, config=cfg))

    a, b = members[0], members[1]
    assert soup_mod.soup_key(a) == soup_mod.soup_key(edited(b, **{"optim.lr": 0.5, "schedule.name": "step"}))
    assert soup_mod.soup_key(a) != soup_mod.soup_key(edited(b, **{"model.backbone": "advanced_cnn"}))
    scratch1 = dataclasses.replace(edited(b), run=dataclasses.replace(b.run, config={**b.run.config, "seed": 1}))
    assert soup_mod.soup_key(a) != soup_mod.soup_key(scratch1)   # from scratch, the seed is the init
    path_a = edited(a, **{"model.pretrained": "/w/init.pt"})
    path_b1 = edited(scratch1, **{"model.pretrained": "/w/init.pt"})
    assert soup_mod.soup_key(path_a) == soup_mod.soup_key(path_b1)   # fine-tuned from one file: any seed
    assert soup_mod.soup_key(path_a) != soup_mod.soup_key(edited(a, **{"model.pretrained": "/w/other.pt"}))
    tv_v1 = edited(a, **{"model.pretrained": "imagenet", "model.weights": "IMAGENET1K_V1"})
    assert soup_mod.soup_key(tv_v1) != soup_mod.soup_key(edited(tv_v1, **{"model.weights": "IMAGENET1K_V2"}))


def test_predict_and_export_take_the_soup_as_a_run(built, trained, tmp_path):
    from mlic_dist.export.formats import export_file
    from mlic_dist.export.model import read_metadata
    from mlic_dist.data.transforms import load_rgb

    manifest = json.loads((trained.shards / "manifest.json").read_text())
    images = {}
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(trained.shards / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    images[Path(member.name).stem] = load_rgb(tar.extractfile(member).read())
    run = rundir.load_run(built["out"])
    val = run.split("val")
    predictor = Predictor(built["out"])
    got = predictor([images[k] for k in val.keys])
    np.testing.assert_allclose(got, val.scores, atol=1e-4)
    assert not np.allclose(got, built["best"].run.split("val").scores, atol=1e-4)   # not the best run's
    done = export_file(built["out"], "onnx", tmp_path / "soup.onnx")
    meta = read_metadata(tmp_path / "soup.onnx")
    assert done and meta["kind"] == "run" and meta["classes"] == run.classes and len(meta["members"]) == 1


def test_cli_logs_the_soup_in_mlflow_and_ensembles_skip_it(trained, tmp_path, capsys):
    uri = isolated_store(trained, tmp_path / "store")
    out = tmp_path / "ens"
    rc = ensemble_cli.main(["--experiment", EXPERIMENT, "--select", "soup", "--tracking-uri", uri,
                            "--out", str(out), "--parent-run-id", trained.parent_run_id, "--soup-bn-batches", "1"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "m1-32-s1 is the only run of its initialisation" in stdout
    (soup_dir,) = [p for p in out.iterdir() if (p / rundir.SOUP).is_file()]
    doc = json.loads((soup_dir / rundir.SOUP).read_text())
    run_id = rundir.load_tracking(soup_dir)["run_id"]
    client = MlflowClient(uri)
    r = client.get_run(run_id)
    tags = r.data.tags
    assert tags["mlic.kind"] == "single" and tags["mlic.derived"] == "soup"
    assert tags["mlic.ingredients"].split(",") == [i["run_id"] for i in doc["ingredients"] if i["kept"]]
    assert sorted(tags["mlic.candidates"].split(",")) == sorted(trained.run_ids[n] for n in SEED0)
    assert tags["mlflow.parentRunId"] == trained.parent_run_id and tags["run_dir"] == str(soup_dir.resolve())
    result = json.loads((soup_dir / rundir.METRICS).read_text())
    assert r.data.metrics["final_val_mAP"] == pytest.approx(result["val"]["mAP"])
    assert r.data.metrics["test_mAP"] == pytest.approx(result["test"]["mAP"])
    assert r.data.params["data.size"] == str(yaml.safe_load((soup_dir / rundir.CONFIG).read_text())["data"]["size"])
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {rundir.SOUP, rundir.BEST_MODEL, "scores_val.npy"} <= artifacts
    # a greedy ensemble built afterwards chooses among the training runs only, never the soup
    rc = ensemble_cli.main(["--experiment", EXPERIMENT, "--select", "greedy", "--tracking-uri", uri,
                            "--out", str(out), "--parent-run-id", trained.parent_run_id])
    capsys.readouterr()
    (greedy,) = [p for p in out.iterdir() if (p / rundir.ENSEMBLE).is_file()]
    candidates = json.loads((greedy / rundir.ENSEMBLE).read_text())["greedy"]["candidates"]
    assert rc == 0 and sorted(c["run_id"] for c in candidates) == sorted(trained.run_ids.values())


def test_sweep_ensembles_accept_soup_and_reject_a_misspelling(trained, tmp_path):
    doc = {"data": {"shards": str(trained.shards), "loader": "torch", "size": 32},
           "model": {"backbone": "tiny_cnn", "pretrained": "none"}, "train": {"epochs": 1},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
           "grid": {"data.size": [32, 40]}, "sweep": {"root": str(tmp_path / "runs")}}
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({**doc, "ensembles": ["soup", "greedy"]}))
    bad.write_text(yaml.safe_dump({**doc, "ensembles": ["soop"]}))
    assert load_sweep(good).ensembles == ("soup", "greedy")
    with pytest.raises(SweepError, match="'soop' is not valid.*'soup'"):
        load_sweep(bad)
