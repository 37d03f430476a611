"""Tracking against a real MLflow SQLite store and real servers (dead, never answering, live):
the background queue never stops or stalls training, a fresh store survives concurrent
trainers, and a run whose tracking failed is re-logged from its run directory."""
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mlic_dist.config import TrackingConfig, load_config
from mlic_dist.relog import relog
from mlic_dist.tracking.tracker import Tracker, final_metrics
from processes import wait_http
from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=32, n_val=10, n_test=8,
                              num_classes=3, samples_per_shard=16)


def train_overrides(shards, out, uri, **extra):
    return tiny_run_overrides(shards, out, **{"tracking.uri": uri, "tracking.experiment": "t", **extra})


def test_run_params_metrics_artifacts_in_a_real_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"mAP": 0.5}')
    t = Tracker(TrackingConfig(uri=uri, experiment="t"), run_dir)
    run_id = t.start({"data.size": 448, "model.backbone": "resnet101"}, tags={"augment": "M2"}, wait_s=60)
    assert run_id is not None
    for step in range(3):
        t.log_metrics({"val_mAP": 0.1 * step, "skipped": None, "nan": float("nan")}, step=step)
    t.log_artifacts([run_dir / "metrics.json", run_dir / "absent.json"])
    assert t.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"data.size": "448", "model.backbone": "resnet101"}
    assert run.data.tags["augment"] == "M2" and run.data.tags["mlflow.runName"] == "run"
    assert [m.value for m in client.get_metric_history(run_id, "val_mAP")] == pytest.approx([0, 0.1, 0.2])
    assert "nan" not in run.data.metrics and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run_id

    # a resumed run re-opens the same MLflow run instead of starting a new one
    t2 = Tracker(TrackingConfig(uri=uri, experiment="t"), run_dir)
    assert t2.start({}, resume_run_id=run_id, wait_s=60) == run_id
    t2.log_metrics({"val_mAP": 0.3}, step=3)
    assert t2.finish()
    assert len(client.get_metric_history(run_id, "val_mAP")) == 4
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_calls_never_wait_for_mlflow_and_queued_metrics_all_arrive(tmp_path, monkeypatch):
    """With MLflow stuck inside a call, 1,000 step metrics are still accepted at once (the
    training loop never waits); once it answers, every one of them arrives."""
    import threading

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stuck, entered = threading.Event(), threading.Event()
    real = MlflowClient.log_batch

    def slow_log_batch(self, *a, **k):
        if k.get("metrics"):
            entered.set()
            stuck.wait(120)
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", slow_log_batch)
    t = Tracker(TrackingConfig(uri=uri, experiment="q"), tmp_path)
    t.start({"a": 1})
    t.log_metrics({"loss": 1.0}, step=0, step_level=True)
    assert entered.wait(60)  # the thread is now inside a call that does not return

    def caller():
        for step in range(1, 1000):
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step, step_level=True)

    c = threading.Thread(target=caller)
    c.start()
    c.join(30)
    assert not c.is_alive() and len(t._queue) >= 999  # all accepted while MLflow was stuck
    stuck.set()
    assert t.finish()
    assert len(MlflowClient(uri).get_metric_history(t.run_id, "loss")) == 1000


def test_a_full_queue_drops_step_metrics_first(tmp_path, free_port):
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port}", experiment="x"), tmp_path, max_queue=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.start({"a": 1})
        for step in range(100):
            t.log_metrics({"loss": 1.0}, step=step, step_level=True)
        t.log_metrics({"val_mAP": 0.5}, step=0)  # an epoch metric evicts a step metric
        kept = [op for _, op in t._queue]
        assert len(kept) <= 20 and kept[-1][1] == {"val_mAP": 0.5} and t.dropped >= 80
        t.finish()


def test_dead_server_warns_once_and_never_raises(tmp_path, free_port):
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port}", experiment="x"), tmp_path)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert t.start({"a": 1}) is None
        for step in range(50):
            t.log_metrics({"loss": 1.0}, step=step)
        assert not t.finish()
    assert time.time() - start < 15
    messages = [str(w.message) for w in caught]
    assert sum("retrying in the background" in m for m in messages) <= 1   # never one per call
    assert sum("mlic_dist.relog" in m for m in messages) == 1


def test_unknown_uri_scheme_is_a_warning_not_a_crash(tmp_path):
    t = Tracker(TrackingConfig(uri="foo://bar", experiment="x"), tmp_path)
    with pytest.warns(UserWarning, match="foo://bar"):
        t.start({"a": 1}, wait_s=30)
        t.log_metrics({"loss": 1.0}, step=0)
        t.finish()
    assert t.run_id is None


def test_disabled_and_non_main_rank_do_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Tracker(TrackingConfig(enabled=False), tmp_path).start({"a": 1}) is None
    assert Tracker(TrackingConfig(), tmp_path, active=False).start({"a": 1}) is None
    assert not (tmp_path / "mlflow.db").exists()


def test_a_start_refused_by_the_server_is_retried(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = MlflowClient.create_run
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("server restarting")
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "create_run", flaky)
    t = Tracker(TrackingConfig(uri=uri, experiment="r"), tmp_path, retry_s=0.1)
    with pytest.warns(UserWarning, match="MLflow start failed"):
        t.start({"a": 1})
        t.log_metrics({"loss": 0.5}, step=0)  # queued behind the start, sent once it succeeds
        assert t.finish()
    assert t.run_id is not None and len(calls) == 2
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"loss": 0.5}


def test_final_metrics_names_match_for_runs_and_ensembles():
    result = {"val": {"mAP": 0.5, "eAP": 0.6, "loss": 0.2, "top3": {"OF1": 0.7, "CP": None},
                      "settings": {"k": 3}},
              "test": {"mAP": 0.4, "thresh": {"CF1": 0.3}}}
    assert final_metrics(result) == {"final_val_mAP": 0.5, "final_val_eAP": 0.6, "final_val_loss": 0.2,
                                     "final_val_top3_OF1": 0.7, "test_mAP": 0.4, "test_thresh_CF1": 0.3}


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


@pytest.mark.dist
def test_three_trainers_on_one_fresh_sqlite_store_all_finish_and_are_recorded(shards, tmp_path):
    """The default store invites this (and a sweep without a server does it): concurrent schema
    creation on a fresh mlflow.db used to crash every trainer and leave a half-migrated file."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", "mlic_dist.train",
                               *train_overrides(shards, tmp_path / f"run{i}", uri, **{"train.epochs": 1})],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["run0", "run1", "run2"]
    assert all(r.info.status == "FINISHED" and "test_mAP" in r.data.metrics for r in runs)


def _silent_server():
    """A TCP server that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def test_a_server_that_never_answers_costs_about_nothing(shards, tmp_path):
    from mlic_dist.train.loop import train

    t0 = time.perf_counter()
    train(load_config(None, train_overrides(shards, tmp_path / "off", "x", **{"tracking.enabled": False})))
    off = time.perf_counter() - t0
    silent = _silent_server()
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.warns(UserWarning, match="relog"):
            train(load_config(None, train_overrides(shards, tmp_path / "silent", uri)))
        hanging = time.perf_counter() - t0
    finally:
        silent.close()
    # Before: every call blocked ~20 s on every rank. Now the queue absorbs it: the same time
    # up to the few seconds' grace finish() gives a server that never answered.
    assert hanging < off + 8, (off, hanging)
    assert (tmp_path / "silent" / "metrics.json").is_file()


def test_a_run_whose_tracking_failed_is_relogged_from_its_directory(shards, tmp_path, free_port):
    from mlflow.tracking import MlflowClient

    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="relog"):
        result = train(load_config(None, train_overrides(shards, out, f"http://127.0.0.1:{free_port}")))
    # the run's own store (its config's tracking.uri) is the default; here another one is given
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    p = subprocess.run([sys.executable, "-m", "mlic_dist.relog", str(out), "--tracking-uri", uri],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_id = json.loads(p.stdout.strip().splitlines()[-1])["run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["data.size"] == "32" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_mAP")] == [0, 1]
    assert run.data.metrics["test_mAP"] == pytest.approx(result["test"]["mAP"])
    assert {"metrics.json", "scores_test.npy", "best_model.pt"} <= {a.path for a in client.list_artifacts(run_id)}
    # relogging again re-opens that run (tracking.json) and adds no duplicate epochs or finals
    assert relog(out, uri) == run_id
    assert len(client.get_metric_history(run_id, "val_mAP")) == 2
    assert len(client.get_metric_history(run_id, "test_mAP")) == 1
    # without --tracking-uri, from another working directory: the store tracking.json names
    # (not a new ./mlflow.db where the command happens to run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg_yaml = (out / "config.yaml").read_text().replace(f"http://127.0.0.1:{free_port}", "null")
    (out / "config.yaml").write_text(cfg_yaml)
    p = subprocess.run([sys.executable, "-m", "mlic_dist.relog", str(out)], capture_output=True,
                       text=True, env=_env(), cwd=elsewhere, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["run_id"] == run_id
    assert not (elsewhere / "mlflow.db").exists()


def test_a_run_whose_server_died_mid_run_is_completed_by_relog_not_duplicated(shards, tmp_path):
    """Fault injection (issue 19): the server stopped after the first epoch left the MLflow run
    RUNNING forever, and relog made a twin without the run's mlic.* tags and dataset input."""
    from mlflow.tracking import MlflowClient

    from mlic_dist.tracking.server import MlflowServer, free_port
    from mlic_dist.train.loop import train

    store, port, out = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port(), tmp_path / "run"
    server = MlflowServer(store, tmp_path / "artifacts", port=port).start()
    try:
        def stop_after_first_epoch(record):
            if record["epoch"] == 0:
                deadline = time.time() + 60   # the run exists in MLflow before its server goes
                while not (json.loads((out / "tracking.json").read_text()).get("run_id")
                           if (out / "tracking.json").is_file() else None):
                    assert time.time() < deadline
                    time.sleep(0.2)
                server.stop()

        with pytest.warns(UserWarning, match="relog"):
            train(load_config(None, train_overrides(shards, out, server.uri)), epoch_hook=stop_after_first_epoch)
        recorded = json.loads((out / "tracking.json").read_text())
        assert recorded["complete"] is False and "unreachable" in recorded["gave_up"]
        client = MlflowClient(store)
        run_id = recorded["run_id"]
        assert client.get_run(run_id).info.status == "RUNNING"          # what the fault left
        live_tags = recorded["tags"]
        assert {"mlic.world_size", "mlic.data.manifest_sha256", "mlic.effective_lr"} <= set(live_tags)

        server = MlflowServer(store, tmp_path / "artifacts", port=port).start()   # it answers again
        assert relog(out) == run_id                                     # that run, completed
        (only,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        assert only.info.run_id == run_id and only.info.status == "FINISHED"
        assert {k: only.data.tags.get(k) for k in live_tags} == live_tags
        assert "unreachable" in only.data.tags["mlic.tracking_gave_up"] and "mlic.relogged" in only.data.tags
        assert len(only.inputs.dataset_inputs) == 1
        assert [m.step for m in client.get_metric_history(run_id, "val_mAP")] == [0, 1]
        after = json.loads((out / "tracking.json").read_text())
        assert after["complete"] is True and "gave_up" not in after
    finally:
        server.stop()


def test_a_run_mlflow_never_saw_is_relogged_with_every_tag_and_input_of_a_live_run(shards, tmp_path, free_port):
    from mlflow.tracking import MlflowClient

    from mlic_dist.train.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(load_config(None, train_overrides(shards, tmp_path / "live", uri, **{"train.epochs": 1})))
    with pytest.warns(UserWarning, match="relog"):
        train(load_config(None, train_overrides(shards, tmp_path / "lost", f"http://127.0.0.1:{free_port}",
                                                **{"train.epochs": 1})))
    assert json.loads((tmp_path / "lost" / "tracking.json").read_text())["run_id"] is None
    relogged_id = relog(tmp_path / "lost", uri)
    client = MlflowClient(uri)
    live = next(r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])
                if r.info.run_id != relogged_id)
    relogged = client.get_run(relogged_id)
    per_run = {"mlflow.runName", "run_dir", "mlic.relogged", "mlic.tracking_gave_up"}
    assert {k: v for k, v in relogged.data.tags.items() if k not in per_run} == \
        {k: v for k, v in live.data.tags.items() if k not in per_run}
    assert "never created" in relogged.data.tags["mlic.tracking_gave_up"]
    assert [(d.dataset.name, d.dataset.digest) for d in relogged.inputs.dataset_inputs] == \
        [(d.dataset.name, d.dataset.digest) for d in live.inputs.dataset_inputs] != []


def test_runs_say_what_code_and_data_made_them(shards, tmp_path):
    """MLflow conventions: the git commit, the shards' manifest digest (tag and dataset input),
    the best weights as an artifact."""
    import hashlib

    from mlflow.tracking import MlflowClient

    from mlic_dist.train.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(load_config(None, train_overrides(shards, tmp_path / "run", uri, **{"train.epochs": 1})))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    from mlic_dist.data.manifest import content_digest

    doc = json.loads((Path(shards) / "manifest.json").read_text())
    content = {"classes": doc["classes"], "splits": {n: [[s["sha256"], s["num_samples"]] for s in i["shards"]]
                                                     for n, i in sorted(doc["splits"].items())}}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    assert content_digest(shards) == digest
    assert run.data.tags["mlic.data.manifest_sha256"] == digest
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest[:36]]
    assert "best_model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["mlic.global_batch_size"] == "8"


def test_a_local_store_that_cannot_be_created_turns_tracking_off_quickly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t = Tracker(TrackingConfig(uri=f"sqlite:///{blocker / 'mlflow.db'}", experiment="x"), tmp_path)
    t0 = time.time()
    with pytest.warns(UserWarning, match="cannot be created or opened"):
        t.start({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        assert not t.finish()
    assert time.time() - t0 < 30 and t.run_id is None


def test_metrics_merged_into_a_failed_request_are_retried_not_lost(tmp_path, monkeypatch):
    """The thread sends queued metric calls in one request; when that request fails, every one of
    them is retried (before: only the first was, and finish() still reported success)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(TrackingConfig(uri=uri, experiment="m"), tmp_path, retry_s=0.1)
    assert t.start({"a": 1}, wait_s=60)
    real, calls = MlflowClient.log_batch, []

    def flaky(self, *a, **k):
        if k.get("metrics"):
            calls.append(len(k["metrics"]))
            if len(calls) == 1:
                raise ConnectionError("server restarting")
        return real(self, *a, **k)

    with t._cv:  # queue five epochs at once, so the thread merges them
        monkeypatch.setattr(MlflowClient, "log_batch", flaky)
        for epoch in range(5):
            t.log_metrics({"val_mAP": epoch / 10}, step=epoch)
    with pytest.warns(UserWarning, match="retrying"):
        assert t.finish()
    assert calls[0] == 5
    assert [m.step for m in MlflowClient(uri).get_metric_history(t.run_id, "val_mAP")] == [0, 1, 2, 3, 4]


def test_without_mlflow_tracking_turns_off_at_once(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.warns(UserWarning, match="mlflow is not installed"):
        t = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'x.db'}", experiment="x"), tmp_path)
    t0 = time.time()
    t.start({"a": 1})
    t.log_metrics({"loss": 1.0}, step=0)
    assert t.finish() and time.time() - t0 < 1 and not (tmp_path / "x.db").exists()


def test_a_given_up_tracker_stops_its_thread(tmp_path, free_port, monkeypatch):
    """After finish() gave up on a dead server, its thread ends once the call in flight returns
    (no leak in a long-lived process, no logging behind the user's back once the server returns).
    MLflow's own HTTP retries decide how long that call takes; here they are off."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port}", experiment="x"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.start({"a": 1})
        assert not t.finish()
    t._thread.join(30)
    assert not t._thread.is_alive() and len(t._queue) == 2  # start and end were never sent


def test_the_documented_mlflow_ui_command_shows_the_stores_runs(tmp_path, free_port):
    """`mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1` (README, docs, the
    demo's and the sweep's closing hint), run where the store is: it serves that store's runs."""
    import signal
    import urllib.request

    from mlflow.tracking import MlflowClient

    from mlic_dist.tracking.store import init_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_sqlite_store(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("demo")
    run = client.create_run(exp, tags={"mlflow.runName": "size=96,augment=M1"}).info.run_id
    client.log_metric(run, "val_mAP", 0.71)
    client.set_terminated(run)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    ui = subprocess.Popen([str(mlflow_bin), "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--host", "127.0.0.1",
                           "--port", str(free_port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    try:
        wait_http(base + "/health", ui, 120, "mlflow ui", poll_s=0.3)
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = json.loads(r.read())["runs"]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):   # the server and its workers (own group)
            try:
                os.killpg(ui.pid, sig)
                ui.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        ui.wait()
    assert [(r["info"]["run_id"], r["info"]["run_name"]) for r in runs] == [(run, "size=96,augment=M1")]
    assert runs[0]["data"]["metrics"][0]["value"] == pytest.approx(0.71)


def test_mlflow_system_metrics_are_in_the_run_and_off_when_asked(shards, tmp_path):
    """MLflow's own sampler (CPU, memory, disk, network) logs into the training run, without a
    node id on one node; tracking.system_metrics=false logs none."""
    from mlflow.tracking import MlflowClient

    from mlic_dist.train.loop import train

    from mlic_dist.tracking.store import init_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_sqlite_store(uri)     # created beforehand: the run exists while these short runs train
    for name, on in (("sampled", True), ("plain", False)):
        train(load_config(None, train_overrides(shards, tmp_path / name, uri, **{
            "train.epochs": 4, "tracking.run_name": name, "tracking.system_metrics": on,
            "tracking.system_metrics_interval_s": 0.2})))
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in
            client.search_runs([client.get_experiment_by_name("t").experiment_id])}
    system = sorted(k for k in runs["sampled"].data.metrics if k.startswith("system/"))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system), system
    assert not any(k.startswith("system/node") for k in system)
    history = client.get_metric_history(runs["sampled"].info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(0 <= m.value <= 100 * os.cpu_count() for m in history)
    assert not [k for k in runs["plain"].data.metrics if k.startswith("system/")]
    assert runs["sampled"].info.status == runs["plain"].info.status == "FINISHED"


def test_a_bad_system_metrics_interval_names_the_key():
    with pytest.raises(ValueError, match="tracking.system_metrics_interval_s=0"):
        TrackingConfig(system_metrics_interval_s=0)
