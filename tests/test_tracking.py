"""Tracking against a real MLflow SQLite store, and a dead server that must not stop training."""
import time
import warnings

import pytest

from mlic_dist.config import TrackingConfig
from mlic_dist.tracking import Tracker


def test_run_params_metrics_artifacts_in_a_real_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"mAP": 0.5}')
    t = Tracker(TrackingConfig(uri=uri, experiment="t"), run_dir)
    run_id = t.start({"data.size": 448, "model.backbone": "resnet101"}, tags={"augment": "M2"})
    for step in range(3):
        t.log_metrics({"val_mAP": 0.1 * step, "skipped": None, "nan": float("nan")}, step=step)
    t.log_artifacts([run_dir / "metrics.json", run_dir / "absent.json"])
    t.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"data.size": "448", "model.backbone": "resnet101"}
    assert run.data.tags["augment"] == "M2" and run.data.tags["mlflow.runName"] == "run"
    assert [m.value for m in client.get_metric_history(run_id, "val_mAP")] == pytest.approx([0, 0.1, 0.2])
    assert "nan" not in run.data.metrics and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]

    # a resumed run re-opens the same MLflow run instead of starting a new one
    t2 = Tracker(TrackingConfig(uri=uri, experiment="t"), run_dir)
    assert t2.start({}, resume_run_id=run_id) == run_id
    t2.log_metrics({"val_mAP": 0.3}, step=3)
    t2.finish()
    assert len(client.get_metric_history(run_id, "val_mAP")) == 4
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_dead_server_warns_once_and_never_raises(tmp_path, free_port):
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port}", experiment="x"), tmp_path)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert t.start({"a": 1}) is None
        for step in range(50):
            t.log_metrics({"loss": 1.0}, step=step)
        t.finish()
    assert time.time() - start < 60
    assert sum("MLflow" in str(w.message) for w in caught) == 1


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
    t = Tracker(TrackingConfig(uri=uri, experiment="r"), tmp_path, retry_s=0)
    with pytest.warns(UserWarning, match="MLflow"):
        assert t.start({"a": 1}) is None
    t.log_metrics({"loss": 0.5}, step=0)  # retries the start, then logs
    t.finish()
    assert t.run_id is not None and len(calls) == 2
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"loss": 0.5}
