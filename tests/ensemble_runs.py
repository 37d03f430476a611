"""Small REAL training runs for the ensemble, report and predict tests.

tiny_cnn on shard_fixtures' shards (4 classes, 14 val / 12 test images), trained by
`mlic_dist.train.train` with the torch loader, logged to a real MLflow SQLite store, nested under
a parent run as a sweep would. Four runs: sizes 32 / 40 (a ScaleEn pair), augmentations M1 / M2
(a DistrEn pair) and a second seed of one config. Trained once per pytest session under its
base temp directory and reused by later modules (like `build_small_shards`); each module copies
the MLflow store (`isolated_store`) so the ensembles one module logs never show up in another.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from shard_fixtures import build_small_shards, tiny_run_overrides

EXPERIMENT = "ens"
SPECS = {   # name -> (data.size, data.augment, seed)
    "m1-32-s0": (32, "M1", 0),
    "m1-40-s0": (40, "M1", 0),
    "m2-32-s0": (32, "M2", 0),
    "m1-32-s1": (32, "M1", 1),
}


@dataclass
class TrainedRuns:
    base: Path
    shards: Path
    runs: dict            # name -> run directory
    uri: str              # sqlite:///... of the shared store (read-only for tests: use isolated_store)
    parent_run_id: str
    run_ids: dict         # name -> MLflow run id


def overrides(shards: Path, out: Path, uri: str, size: int, augment: str, seed: int, parent: str | None,
              epochs: int = 2, experiment: str = EXPERIMENT) -> list[str]:
    extra = {"seed": seed, "data.size": size, "data.augment": augment, "optim.name": "adam", "optim.lr": 0.01,
             "optim.head_lr": 0.01, "schedule.name": "none", "train.epochs": epochs, "tracking.uri": uri,
             "tracking.experiment": experiment}
    if parent:
        extra["tracking.parent_run_id"] = parent
    return tiny_run_overrides(shards, out, **extra)


def train_small_runs(base: Path) -> TrainedRuns:
    from mlflow.tracking import MlflowClient

    from mlic_dist.config import load_config
    from mlic_dist.tracking.store import ensure_experiment, init_sqlite_store
    from mlic_dist.train.loop import train

    base = Path(base)
    shards = build_small_shards(base, n_train=48, n_val=14, n_test=12, num_classes=4, samples_per_shard=9)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    done = base / "runs.json"
    if done.is_file():
        info = json.loads(done.read_text())
    else:
        init_sqlite_store(uri)
        client = MlflowClient(uri)
        parent = client.create_run(ensure_experiment(client, EXPERIMENT), tags={"mlflow.runName": "sweep"}).info.run_id
        info = {"parent": parent, "runs": {}, "run_ids": {}}
        for name, (size, augment, seed) in SPECS.items():
            out = base / "runs" / name
            train(load_config(None, overrides(shards, out, uri, size, augment, seed, parent)))
            info["runs"][name] = str(out)
        client.set_terminated(parent)
        for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]):
            if r.info.run_name in SPECS:
                info["run_ids"][r.info.run_name] = r.info.run_id
        done.write_text(json.dumps(info))
    return TrainedRuns(base, shards, {k: Path(v) for k, v in info["runs"].items()}, uri, info["parent"],
                       info["run_ids"])


def isolated_store(trained: TrainedRuns, dest: Path) -> str:
    """A copy of the shared MLflow store for one test module; returns its URI."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained.base / "mlflow.db", dest / "mlflow.db")
    return f"sqlite:///{dest / 'mlflow.db'}"
