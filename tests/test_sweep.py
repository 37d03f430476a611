"""The Ray Tune sweep end to end on real shards, a real (simulated 2-node) Ray cluster and a real
MLflow server: the grid tracked as nested runs, 2 Ray Train workers per trial as one DDP job, a
worker SIGKILLed mid-training resuming from its checkpoint, a SIGKILLed sweep whose mlflow server
ends with it, finished by --resume without redoing finished trials, and bad input stopped before
anything starts."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mlic_dist.sweep.spec import SweepError, load_sweep
from processes import Descendants, group
from shard_fixtures import build_small_shards

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "launch" / "sweep.py"
pytestmark = pytest.mark.dist

HEADER = re.compile(r"^\[sweep\] worker rank (\d+)/(\d+) pid (\d+) on \S+ node (\w+)", re.M)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 64 training samples: 4 steps per epoch for 2 workers of batch 8 (room to be killed mid-epoch)
    return build_small_shards(tmp_path_factory.mktemp("sweep-shards"), n_train=64, n_val=12, n_test=8,
                              num_classes=4, samples_per_shard=8)


def write_sweep(path: Path, shards, root, grid, tracking_uri=None, ensembles=("scale", "distr", "greedy"),
                **sweep) -> Path:
    doc = {
        "data": {"shards": str(shards), "loader": "torch", "batch_size_per_gpu": 8, "num_workers": 1, "size": 32},
        "model": {"backbone": "tiny_cnn", "pretrained": "none"},
        "train": {"epochs": 2, "mixed_precision": "no"},
        "tracking": {"uri": tracking_uri, "experiment": path.stem},
        "grid": grid,
        "ensembles": list(ensembles),
        "sweep": {"root": str(root), "progress_every_s": 10, **sweep},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def headers(trial_dir: Path) -> list[tuple[int, int, int, str]]:
    """(rank, world, pid, node) of every worker start rank 0 logged in the trial's train.log."""
    text = (trial_dir / "train.log").read_text()
    return [(int(r), int(w), int(p), n) for r, w, p, n in HEADER.findall(text)]


def history(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "history.jsonl").read_text().splitlines()]


def client_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


# --------------------------------------------------------------------------- the grid on 2 nodes


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # Two simulated nodes of 2 logical CPUs; the head also offers the trial-driver resource.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                      "resources": {"trial_driver": 16}})
    try:
        c.add_node(num_cpus=2)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mlic_dist.tracking.server import MlflowServer

    db = tmp_path_factory.mktemp("sweep-mlflow") / "mlflow.db"
    with MlflowServer(f"sqlite:///{db}") as s:
        yield s


@pytest.fixture(scope="module")
def grid_sweep(shards, cluster, server, tmp_path_factory):
    """2 sizes x 2 augmentations, 2 workers per trial, on the 2-node cluster, tracked over HTTP;
    rank 0 of one trial is SIGKILLed mid-way through its second epoch."""
    from mlic_dist.sweep.run import run_sweep

    tmp = tmp_path_factory.mktemp("grid")
    path = write_sweep(tmp / "grid.yaml", shards, tmp / "runs", {"data.size": [32, 48], "data.augment": ["M1", "M2"]},
                       tracking_uri=server.uri, workers_per_trial=2)
    spec = load_sweep(path, ["train.epochs=3", "train.checkpoint_every_steps=1"])
    victim_dir = spec.root_dir / "size=32,augment=M1"
    killed = {}

    def kill_rank0_mid_epoch():
        # once a checkpoint inside epoch 1 or later exists
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            mid = [p for p in (victim_dir / "checkpoints").glob("e*-s*")
                   if re.fullmatch(r"e(\d{4})-s(\d{7})", p.name) and int(p.name[1:5]) >= 1 and int(p.name[7:]) >= 1]
            if mid:
                rank0 = [h for h in headers(victim_dir) if h[0] == 0]
                os.kill(rank0[-1][2], signal.SIGKILL)
                killed.update(pid=rank0[-1][2], at=time.time(), checkpoint=mid[0].name)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rank0_mid_epoch, daemon=True)
    killer.start()
    t0 = time.time()
    rc = run_sweep(spec, address=cluster.address)
    killer.join(1)
    return {"rc": rc, "spec": spec, "uri": server.uri, "killed": killed, "victim": victim_dir,
            "wall_s": time.time() - t0}


@pytest.mark.slow
def test_grid_tracks_a_parent_run_and_one_child_per_point(grid_sweep):
    spec, uri = grid_sweep["spec"], grid_sweep["uri"]
    assert grid_sweep["rc"] == 0
    client, runs = client_runs(uri, "grid")
    (parent,) = [r for r in runs if r.info.run_name == spec.name]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["grid.data.size"]) == [32, 48]
    assert "grid.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    state = json.loads((spec.root_dir / "sweep.json").read_text())
    assert state["parent_run_id"] == parent.info.run_id
    trials = {t.name for t in spec.trials()}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.info.run_name in trials]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(trials)  # one finished run per grid point
    # a killed attempt that had not recorded its run yet leaves a second one, closed by the sweep
    assert all(r.info.status == "KILLED" for r in children if r not in finished)
    for run in finished:
        size, augment = re.fullmatch(r"size=(\d+),augment=(M\d)", run.info.run_name).groups()
        assert (run.data.params["data.size"], run.data.params["data.augment"]) == (size, augment)
        assert run.data.tags["run_dir"] == str(spec.root_dir / run.info.run_name)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mAP"))
        assert steps == [0, 1, 2], f"{run.info.run_name}: per-epoch metrics {steps}"  # each epoch once
        assert "test_mAP" in run.data.metrics


@pytest.mark.slow
def test_two_workers_of_a_trial_train_as_one_ddp_job_on_either_node(grid_sweep):
    spec = grid_sweep["spec"]
    nodes = set()
    for t in spec.trials():
        metrics = json.loads((t.output_dir / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        # rank 0 logs world 2; the config the trial ran is the grid point's
        assert {(r, w) for r, w, _, _ in headers(t.output_dir)} == {(0, 2)}
        ran = yaml.safe_load((t.output_dir / "config.yaml").read_text())
        assert (ran["data"]["size"], ran["data"]["augment"]) == (t.cfg.data.size, t.cfg.data.augment)
        nodes |= {n for *_, n in headers(t.output_dir)}
    assert len(nodes) == 2, "trials should land on both nodes of the cluster"


@pytest.mark.slow
def test_a_killed_worker_resumes_its_trial_from_the_checkpoint(grid_sweep):
    victim, killed = grid_sweep["victim"], grid_sweep["killed"]
    assert killed, "the victim trial never reached a step checkpoint in epoch 1 or later"
    starts = headers(victim)
    assert len(starts) == 2 and starts[0][2] == killed["pid"] and starts[1][2] != killed["pid"]
    log = (victim / "train.log").read_text()
    after_restart = log[log.rindex("[sweep] worker rank 0/2"):]
    resumed = re.search(r"resumed from \S+ \(epoch (\d+), step (\d+)\)", after_restart)
    assert resumed and int(resumed.group(1)) >= 1, "the restarted worker group began again from epoch 0"
    assert [h["epoch"] for h in history(victim)] == [0, 1, 2]
    assert json.loads((victim / "metrics.json").read_text())["epochs_run"] == 3


@pytest.mark.slow
def test_ensembles_of_the_finished_trials_are_nested_runs(grid_sweep):
    spec = grid_sweep["spec"]
    client, runs = client_runs(grid_sweep["uri"], "grid")
    (parent,) = [r for r in runs if r.info.run_name == spec.name]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = {r.info.run_id for r in nested if r.info.run_name in {t.name for t in spec.trials()}
                  and r.info.status == "FINISHED"}
    ensembles = [r for r in nested if r.data.tags.get("mlic.kind") == "ensemble"]
    # 2 sizes x 2 augmentations: a ScaleEn per augmentation, a DistrEn per size, one greedy
    kinds = sorted(r.data.tags["mlic.ensemble_kind"] for r in ensembles)
    assert kinds == ["distr", "distr", "greedy", "scale", "scale"]
    for r in ensembles:
        assert r.info.status == "FINISHED" and "test_mAP" in r.data.metrics
        assert set(r.data.tags["mlic.members"].split(",")) <= trial_runs  # finished trials only
    assert any(r.data.tags.get("mlic.kind") == "report" for r in nested)  # the report, nested too


# --------------------------------------------------------------------------- the driver killed


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False




def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep_cli(args, cwd):
    # RAY_ADDRESS: set by the cluster fixture; MLFLOW_TRACKING_URI: the sweep file says where to track
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_a_killed_sweep_finishes_with_resume_without_redoing_finished_trials(shards, tmp_path):
    # Two trials at once on this machine's own Ray, tracked in a local SQLite store (so the sweep
    # serves it with an mlflow server): a 1-epoch trial finishes while a 12-epoch one is part-way
    # when the sweep's process is SIGKILLed.
    path = write_sweep(tmp_path / "resume.yaml", shards, tmp_path / "runs", {"train.epochs": [1, 12]},
                       ensembles=(), max_concurrent=2, report=False)  # the grid test covers those
    args = ["--config", str(path), "train.checkpoint_every_steps=1"]
    spec = load_sweep(path, args[2:])
    short, long = (t.output_dir for t in spec.trials())
    descendants = Descendants().__enter__()
    proc = _sweep_cli(args, tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if any("epochs=1 finished" in ln for ln in lines) and list((long / "checkpoints").glob("e*")):
                break
            time.sleep(0.05)
        time.sleep(3)  # Tune records a finished trial in its saved state within 2 s
        assert proc.poll() is None and not (long / "metrics.json").exists(), \
            "the sweep ended before it could be killed:\n" + "".join(lines)[-3000:]
        proc.kill()  # the sweep's own process only, as a crash would
        proc.wait()
        # Ray's workers and agents, reparented, used to wait 1-5 min for their GCS: the sweep's
        # reaper ends them (and the mlflow server's watchdog its server) within seconds
        left = descendants.survivors(grace_s=15)
        assert not left, f"alive 15 s after the sweep's driver was SIGKILLed: {left}"
    finally:
        descendants.__exit__(None, None, None)
        _kill_group(proc.pid)  # should anything have outlived it, for the tests that follow
    state = json.loads((spec.root_dir / "sweep.json").read_text())
    old_server = state["mlflow_server"]["pid"]   # the group of the server, led by its watchdog
    # the sweep could not stop its mlflow server (its own session); the watchdog did, within seconds
    deadline = time.time() + 15
    while group(old_server) and time.time() < deadline:
        time.sleep(0.2)
    assert not group(old_server), f"the killed sweep's mlflow server is still running: {group(old_server)}"
    short_metrics = (short / "metrics.json").stat().st_mtime_ns
    try:
        again = _sweep_cli(args + ["--resume"], tmp_path)
        out, _ = again.communicate(timeout=500)
    finally:
        _kill_group(old_server)
        _kill_group(again.pid)
    assert again.returncode == 0, out[-4000:]
    assert not _alive(old_server)
    assert len(headers(short)) == 1 and (short / "metrics.json").stat().st_mtime_ns == short_metrics
    assert len(headers(long)) == 2 and re.search(r"resumed from \S+ \(epoch \d+, step \d+\)",
                                                  (long / "train.log").read_text())
    assert [h["epoch"] for h in history(long)] == list(range(12))
    client, runs = client_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    (parent,) = [r for r in runs if r.info.run_name == spec.name]
    assert parent.info.run_id == state["parent_run_id"] and parent.info.status == "FINISHED"
    finished = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                      and r.info.status == "FINISHED" and r.info.run_name in {t.name for t in spec.trials()})
    assert finished == sorted(t.name for t in spec.trials())
    assert f"#/experiments/{parent.info.experiment_id}/runs" in out  # the UI hint opens the runs page


@pytest.mark.slow
def test_ctrl_c_mid_sweep_exits_130_and_calls_no_trial_stopped(shards, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the foreground process group) part-way through a trial:
    Tune ends the trials and marks them TERMINATED like ASHA's stops, so the sweep took the
    unfinished trial for one stopped early and exited 0."""
    path = write_sweep(tmp_path / "int.yaml", shards, tmp_path / "runs", {"train.epochs": [12]},
                       ensembles=(), report=False, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = load_sweep(path, ["train.checkpoint_every_steps=1"])
    (trial,) = spec.trials()
    proc = _sweep_cli(["--config", str(path), "train.checkpoint_every_steps=1"], tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not list((trial.output_dir / "checkpoints").glob("e*")):
            time.sleep(0.1)
        assert proc.poll() is None, "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        reader.join(10)
    finally:
        _kill_group(proc.pid)
    text = "".join(lines)
    assert rc == 130, text[-3000:]
    assert re.search(rf"^\| {re.escape(trial.name)} \| unfinished \|", text, re.M), text[-3000:]
    assert "--resume" in text and not (trial.output_dir / "metrics.json").exists()


# --------------------------------------------------------------------------- ASHA, more trials than slots


@pytest.mark.slow
@pytest.mark.timeout(420)   # the fault this guards against stalled the sweep, it did not fail it
def test_asha_with_more_trials_than_slots_stops_some_and_errors_none(shards, tmp_path):
    """8 learning rates (1e-6 .. 0.1, backbone and head) on 2 slots with ASHA (grace 1 epoch,
    reduction factor 2): every trial ends finished or stopped, none errors, the stopped ones'
    MLflow runs are closed KILLED and never enter an ensemble, the sweep exits 0 and none of its
    processes (Ray's workers, its mlflow server) outlives it."""
    import io

    from mlic_dist.sweep.run import run_sweep

    # the likely best first: ASHA promotes the first trials to reach a rung, so weak late ones stop
    lrs = [0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(tmp_path / "asha.yaml", shards, tmp_path / "runs",
                       {"optim": [{"name": f"{lr:g}", "optim.lr": lr, "optim.head_lr": lr} for lr in lrs]},
                       tracking_uri=uri, ensembles=("greedy",), max_concurrent=2, asha=True, grace_period=1,
                       reduction_factor=2, report=False)
    spec = load_sweep(path, ["train.epochs=3"])
    out = io.StringIO()
    t0 = time.time()
    with Descendants() as procs:
        rc = run_sweep(spec, out=out)
    text = out.getvalue()
    survivors = procs.survivors(grace_s=30)
    print(f"asha sweep: {time.time() - t0:.0f} s, {len(procs.seen)} processes")
    assert rc == 0, text[-4000:]
    assert not survivors, f"processes of the sweep outlived it: {survivors}"
    rows = dict(re.findall(r"^\| (optim=[^ |]+) \| ([a-z ]+?) \|", text, re.M))
    assert sorted(rows) == sorted(t.name for t in spec.trials()), text[-4000:]
    assert set(rows.values()) <= {"finished", "stopped early"}, rows
    stopped = {n for n, s in rows.items() if s == "stopped early"}
    finished = {n for n, s in rows.items() if s == "finished"}
    assert stopped and finished, rows
    assert "failed:" not in text and "Could not re-use actor" not in text
    for t in spec.trials():   # a stopped trial is stopped, not run on to the end
        assert (t.output_dir / "metrics.json").is_file() == (t.name in finished)
    from mlic_dist.sweep.state import stopped_early

    assert stopped_early(spec.root_dir) == stopped   # recorded at once, for a --resume to honour
    client, runs = client_runs(uri, "asha")
    (parent,) = [r for r in runs if r.info.run_name == spec.name]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 0
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.info.run_name in rows]
    assert not [r.info.run_name for r in children if r.info.status == "RUNNING"]
    assert {r.info.run_name for r in children if r.info.status == "FINISHED"} == finished
    assert all(r.info.status == "KILLED" for r in children if r.info.run_name in stopped)
    finished_ids = {r.info.run_id for r in children if r.info.status == "FINISHED"}
    ensembles = [r for r in runs if r.data.tags.get("mlic.kind") == "ensemble"]
    if len(finished) >= 2:
        assert ensembles, text[-3000:]
    else:   # the stopped trials are not counted as members either
        assert f"ensembles skipped: {len(finished)} finished trial(s)" in text, text[-3000:]
    for r in ensembles:   # finished trials only, never a stopped one
        assert set(r.data.tags["mlic.members"].split(",")) <= finished_ids


# --------------------------------------------------------------------------- bad input


def _main(argv, capsys):
    sys.path.insert(0, str(SWEEP.parent))
    try:
        import importlib

        cli = importlib.import_module("sweep")
    finally:
        sys.path.remove(str(SWEEP.parent))
    rc = cli.main(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("override, expected", [
    ("grid.data.sise=[32]", "'data.sise'"),
    ("grid.model.backbone=[resnet1010]", "resnet1010"),
    ("grid.data.augment=[M1,M7]", "M7"),
    ("data.shards=SHARDS/nowhere", "manifest.json"),
    ("grid.data.size=[]", "grid.data.size is an empty list"),
    ("grid.data.size=[96,", "'grid.data.size=[96,': '[96,' is not valid YAML"),   # the shell ate nothing
    ("grid.data.size", "'grid.data.size' has no value: write grid.data.size=[v1,v2]"),
    ("sweep=5", "sweep: must be a mapping of sweep settings, got 5"),
    ("ensembles=[{kind: scale, where: {data.sise: 32}}]", "ensembles[0].where key 'data.sise' is not a config key"),
    ("ensembles=[{kind: distr, where: {data.size: 640}}]", "data.size=[640] matches no trial"),
    ("ensembles=[{kind: greedy, where: {data.size: 32}}]", "kind='greedy' must be one of"),
])
def test_bad_input_is_one_line_and_starts_nothing(shards, tmp_path, capsys, override, expected):
    import ray

    path = write_sweep(tmp_path / "bad.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]})
    rc, cap = _main(["--config", str(path), override.replace("SHARDS", str(tmp_path))], capsys)
    assert rc == 2 and expected in cap.err and len(cap.err.strip().splitlines()) == 1
    assert "Traceback" not in cap.err and not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_an_empty_grid_and_a_local_store_on_a_cluster_are_refused(shards, tmp_path, capsys):
    path = write_sweep(tmp_path / "empty.yaml", shards, tmp_path / "runs", {})
    rc, cap = _main(["--config", str(path)], capsys)
    assert rc == 2 and "has no grid" in cap.err
    for section, value in (("sweep", 5), ("grid", [32, 48])):   # a section that is not a mapping
        doc = yaml.safe_load(path.read_text())
        doc.update({"grid": {"data.size": [32]}, section: value})
        (tmp_path / "section.yaml").write_text(yaml.safe_dump(doc))
        rc, cap = _main(["--config", str(tmp_path / "section.yaml"), "grid.seed=[0,1]"], capsys)
        assert rc == 2 and f"section.yaml: {section}: must" in cap.err and len(cap.err.strip().splitlines()) == 1
        assert "Traceback" not in cap.err
    path = write_sweep(tmp_path / "local.yaml", shards, tmp_path / "runs", {"data.size": [32]})
    rc, cap = _main(["--config", str(path), "--address", "auto"], capsys)
    assert rc == 2 and "local file store" in cap.err and "tracking.uri=http://" in cap.err
    assert not (tmp_path / "runs").exists()


def test_mlflow_port_in_use_or_without_a_server_of_its_own_is_refused(shards, tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "port.yaml", shards, tmp_path / "runs", {"data.size": [32]})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, cap = _main(["--config", str(path), "--mlflow-port", str(port)], capsys)
    assert rc == 2 and f"127.0.0.1:{port} is in use" in cap.err and len(cap.err.strip().splitlines()) == 1
    path = write_sweep(tmp_path / "remote.yaml", shards, tmp_path / "runs", {"data.size": [32]},
                       tracking_uri="http://127.0.0.1:9")
    rc, cap = _main(["--config", str(path), "--mlflow-port", "5000"], capsys)
    assert rc == 2 and "starts no MLflow server" in cap.err and "drop --mlflow-port" in cap.err
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_user_error_exits_2_without_traceback(shards, tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", shards, tmp_path / "runs", {"model.backbone": ["resnet1010"]})
    p = subprocess.run([sys.executable, str(SWEEP), "--config", str(path)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "model registry" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_dry_run_lists_every_trial_and_its_resources(shards, tmp_path, capsys):
    path = write_sweep(tmp_path / "dry.yaml", shards, tmp_path / "runs",
                       {"data.size": [32, 48], "data.augment": ["M1", "M2", "M3"]})
    rc, cap = _main(["--config", str(path), "--dry-run", "--workers-per-trial", "2"], capsys)
    assert rc == 0
    lines = [ln for ln in cap.out.splitlines() if ln.startswith("  size=")]
    assert len(lines) == 6 and "2 worker(s)" in cap.out
    assert any(ln.startswith("  size=48,augment=M3:") and str(tmp_path / "runs" / "dry" / "size=48,augment=M3") in ln
               for ln in lines)
    assert not (tmp_path / "runs").exists()


def test_cli_flags_reach_the_sweep_settings(shards, tmp_path, capsys, monkeypatch):
    """Each option of launch/sweep.py overrides its `sweep:` setting (the run itself is not started)."""
    import mlic_dist.sweep.__main__ as sweep_cli

    seen = {}
    monkeypatch.setattr(sweep_cli, "run_sweep", lambda spec, **kw: seen.update(spec=spec, **kw) or 0)
    path = write_sweep(tmp_path / "flags.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]})
    rc, _ = _main(["--config", str(path), "--workers-per-trial", "2", "--gpus-per-worker", "0.5",
                   "--cpus-per-worker", "3", "--max-concurrent", "4", "--max-failures", "5", "--asha",
                   "--resume", "--address", "auto"], capsys)
    s = seen["spec"].settings
    assert rc == 0 and (s.workers_per_trial, s.gpus_per_worker, s.cpus_per_worker) == (2, 0.5, 3.0)
    assert (s.max_concurrent, s.max_failures, s.asha) == (4, 5, True)
    assert (seen["address"], seen["resume"], seen["dry_run"]) == ("auto", True, False)
    rc, _ = _main(["--config", str(path)], capsys)   # without flags: the file's (here the defaults)
    s = seen["spec"].settings
    assert (s.workers_per_trial, s.gpus_per_worker, s.max_failures, s.asha) == (1, None, 2, False)
    assert (seen["address"], seen["resume"]) == (None, False)


# --------------------------------------------------------------------------- after the trials


def test_settling_completes_finished_trials_from_their_directories_and_closes_the_rest(shards, tmp_path):
    """A finished trial whose MLflow run is RUNNING and lacks epochs (its worker was SIGKILLed
    before the tracking queue drained) is completed from its run directory; a second attempt's
    stray run, another FINISHED copy of the trial, a trial stopped early (also when its trainer said FAILED) and a failed trial are
    closed; another sweep's run is left alone; only the finished trial keeps a run id."""
    from mlflow.tracking import MlflowClient

    from mlic_dist import rundir
    from mlic_dist.config import load_config
    from mlic_dist.sweep.results import TrialOutcome, settle_trial_runs, table
    from mlic_dist.train.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("settle")
    parent = client.create_run(exp, tags={"mlflow.runName": "sweep"}).info.run_id

    def child(name, status=None):
        run_id = client.create_run(exp, tags={"mlflow.runName": name, "mlflow.parentRunId": parent}).info.run_id
        if status:
            client.set_terminated(run_id, status)
        return run_id

    out = tmp_path / "a"
    train(load_config(None, [f"data.shards={shards}", "data.size=32", "data.loader=torch", "data.num_workers=1",
                             "data.batch_size_per_gpu=8", "model.backbone=tiny_cnn", "model.pretrained=none",
                             "train.epochs=2", "train.mixed_precision=no", f"train.output_dir={out}",
                             "tracking.enabled=false", "tracking.experiment=settle", "tracking.run_name=a",
                             f"tracking.parent_run_id={parent}"]))
    stray, partial, copy = child("a"), child("a"), child("a", "FINISHED")   # copy: an earlier FINISHED one
    client.log_metric(partial, "val_mAP", 0.5, step=0)   # epoch 1 and the final metrics never arrived
    rundir.write_tracking(out, uri, "settle", partial)
    stopped, stopped_said_failed, failed = child("b"), child("d", "FAILED"), child("c")
    other_sweep = client.create_run(exp, tags={"mlflow.runName": "a"}).info.run_id
    results = [TrialOutcome("a", "finished", 2, 0.9, run_dir=out), TrialOutcome("b", "stopped early", 1, 0.5),
               TrialOutcome("c", "failed", 0, None, error="boom"), TrialOutcome("d", "stopped early", 1, 0.4)]
    settle_trial_runs(uri, "settle", parent, results)
    status = {r: client.get_run(r).info.status for r in (stray, partial, copy, stopped, stopped_said_failed, failed)}
    assert status == {stray: "KILLED", partial: "FINISHED", copy: "KILLED", stopped: "KILLED",
                      stopped_said_failed: "KILLED", failed: "FAILED"}   # one FINISHED run per finished trial
    assert sorted(m.step for m in client.get_metric_history(partial, "val_mAP")) == [0, 1]
    assert "test_mAP" in client.get_run(partial).data.metrics
    assert client.get_run(other_sweep).info.status == "RUNNING"  # not this sweep's
    assert [o.run_id for o in results] == [partial, None, None, None]
    assert table(results).splitlines()[2].startswith("| a | finished | 2 | 0.9000 | " + partial)


def test_the_best_val_map_counts_the_weight_ema_where_it_won(shards, tmp_path):
    """With train.ema_decay the EMA competes with the raw weights for best_model.pt: the trial
    table, the parent run's best_val_mAP and the progress view take the better of the two."""
    import io
    import types

    from mlic_dist import rundir
    from mlic_dist.sweep.progress import ProgressView
    from mlic_dist.sweep.results import outcomes, table

    path = write_sweep(tmp_path / "ema.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]})
    spec = load_sweep(path, ["train.ema_decay=0.9"])
    a, b = spec.trials()
    # (val_mAP, val_mAP_ema) per epoch, as the trainer writes them: the EMA wins a's last epoch
    curves = {a.name: [(0.50, 0.55), (0.60, 0.72)], b.name: [(0.65, 0.60), (0.70, float("nan"))]}
    for t in (a, b):
        t.output_dir.mkdir(parents=True)
        rundir.write_history(t.output_dir, [{"epoch": e, "val_mAP": raw, "val_mAP_ema": ema}
                                            for e, (raw, ema) in enumerate(curves[t.name])])
    grid = [types.SimpleNamespace(config=dict(t.point), error=None, metrics={}) for t in (a, b)]
    from mlic_dist.sweep.state import record_stopped

    assert {o.status for o in outcomes(grid, spec)} == {"unfinished"}   # Ctrl-C'd: TERMINATED to Tune too
    for t in (a, b):
        record_stopped(spec, t.name)                                     # ASHA stopped them
    results = outcomes(grid, spec)
    assert [(o.name, o.epochs, o.best_val_mAP) for o in results] == [(a.name, 2, 0.72), (b.name, 2, 0.70)]
    assert table(results).splitlines()[2].startswith(f"| {a.name} | stopped early | 2 | 0.7200 |")
    view = ProgressView(2, stream=io.StringIO())
    for t in (a, b):
        for e, (raw, ema) in enumerate(curves[t.name]):
            view.on_trial_result(e, [], t.name, {"epochs_done": e + 1, "val_mAP": raw, "val_mAP_ema": ema})
    assert view.best == (0.72, a.name) and "best val_mAP 0.7200 " + a.name in view.summary()


def test_the_progress_view_after_a_worker_restart_and_a_resume():
    """Fault injection (issue 19): a worker restart replays an epoch, which printed a "new best"
    that was none; a --resume started at "0/N done" with no best."""
    import io
    import types

    from mlic_dist.sweep.progress import ProgressView

    out = io.StringIO()
    view = ProgressView(3, stream=out)
    view.on_trial_result(0, [], "a", {"epochs_done": 1, "val_mAP": 0.50})
    view.on_trial_result(1, [], "a", {"epochs_done": 2, "val_mAP": 0.60})
    view.on_trial_result(2, [], "a", {"epochs_done": 2, "val_mAP": 0.61})   # epoch 2 again, after a restart
    assert out.getvalue().count("new best") == 2 and view.best == (0.60, "a")
    view.on_trial_result(3, [], "a", {"epochs_done": 3, "val_mAP": 0.65})
    assert out.getvalue().count("new best") == 3

    class Trial(types.SimpleNamespace):   # what a callback reads of Tune's Trial
        def __str__(self):
            return self.name

    # --resume: Tune restores the callback (setup) and the trials, one finished, two to go
    restored = [Trial(status="TERMINATED", last_result={"epochs_done": 3, "val_mAP": 0.7, "best_val_mAP": 0.72},
                      name="a"),
                Trial(status="PENDING", last_result={"epochs_done": 1, "val_mAP": 0.4}, name="b"),
                Trial(status="PENDING", last_result={}, name="c")]
    out = io.StringIO()
    view.stream = out
    view.setup()
    view.on_step_begin(0, restored)
    assert view.summary().startswith("1/3 done") and view.best == (0.72, "a")
    view.on_trial_result(1, restored, restored[1], {"epochs_done": 1, "val_mAP": 0.4})   # replayed
    view.on_trial_result(2, restored, restored[1], {"epochs_done": 2, "val_mAP": 0.71})
    assert "new best" not in out.getvalue()


def test_a_trial_asha_stopped_stays_stopped_on_resume(shards, tmp_path):
    """Tune saves its state every few seconds: a trial ASHA stopped just before the sweep was
    killed came back RUNNING and, ASHA's rung already holding it, ran to the end while the other
    stopped trials stayed stopped. The stop is recorded at once and the trial's driver honours it."""
    from mlic_dist.sweep.cluster import Plan
    from mlic_dist.sweep.state import stopped_early, write_state
    from mlic_dist.sweep.tune import TrialContext, make_stop_recorder, run_trial

    path = write_sweep(tmp_path / "stop.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]}, asha=True)
    spec = load_sweep(path, ["train.epochs=3"])
    spec.root_dir.mkdir(parents=True)
    state = write_state(spec, {}, parent_run_id="p")
    a, b = spec.trials()
    recorder = make_stop_recorder(spec)

    class Trial:
        def __init__(self, name):
            self.name = name

        def __str__(self):
            return self.name

    recorder.on_trial_result(0, [], Trial(a.name), {"epochs_done": 1, "val_mAP": 0.3})                 # goes on
    recorder.on_trial_result(0, [], Trial(b.name), {"epochs_done": 3, "val_mAP": 0.3, "done": True})   # its last epoch
    assert stopped_early(spec.root_dir) == set()
    recorder.on_trial_result(1, [], Trial(a.name), {"epochs_done": 1, "val_mAP": 0.2, "done": True})   # ASHA: STOP
    assert stopped_early(spec.root_dir) == {a.name}
    write_state(spec, state, mlflow_server={"pid": 1})      # the driver's own writes keep the record
    assert stopped_early(spec.root_dir) == {a.name}
    plan = Plan(workers=1, cpus_per_worker=1, gpus_per_worker=0, driver_resources={}, max_concurrent=1, cluster={})
    ctx = TrialContext(spec, plan, "sqlite:///x.db", "p", worker=lambda cfg: pytest.fail("trained a stopped trial"))
    assert run_trial(dict(a.point), ctx) is None            # returns at once: nothing trains
    assert not a.output_dir.exists()


def test_the_sweeps_own_ray_listens_on_loopback_only():
    """Without --address the sweep starts Ray here; every server of it (GCS, raylet, object
    manager, workers, runtime-env agent) must listen on 127.0.0.1, not on every interface."""
    import ipaddress

    import psutil
    import ray
    from ray._private import ray_constants

    from mlic_dist.sweep.cluster import LOOPBACK_ENV, connect

    def listeners() -> dict:
        """(ip, port) -> process name of every listening socket of this process and its children."""
        procs = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
        procs[os.getpid()] = "driver"
        return {(c.laddr.ip, c.laddr.port): procs[c.pid] for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in procs}

    before = listeners()     # another test's cluster or servers, still up in this process
    connect(None)
    try:
        @ray.remote
        def node_ip():
            return ray.util.get_node_ip_address()

        assert ray.get(node_ip.remote()) == "127.0.0.1"          # a worker started (it listens too)
        listening = [(ip, name) for (ip, port), name in listeners().items() if (ip, port) not in before]
        names = {n for _, n in listening}
        assert {"gcs_server", "raylet"} <= names and len(listening) >= 5, listening

        def loopback(ip):
            a = ipaddress.ip_address(ip)
            return (getattr(a, "ipv4_mapped", None) or a).is_loopback
        assert all(loopback(ip) for ip, _ in listening), [x for x in listening if not loopback(x[0])]
    finally:
        ray.shutdown()
    # the switch is put back: a later ray.init in this process (a cluster) gets the routable address
    assert ray_constants.ENABLE_RAY_CLUSTER and LOOPBACK_ENV not in os.environ


def test_a_killed_trial_driver_gives_its_workers_placement_group_back():
    """A trial's driver killed by Tune (ASHA) leaves its Ray Train workers' placement group behind
    (it lives as long as the job); the releaser removes it when Tune reports the trial over."""
    import types

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from mlic_dist.sweep.tune import make_releaser

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Driver:  # reserves like Ray Train's controller does, then dies without cleaning up
            def reserve(self):
                pg = placement_group([{"CPU": 1}, {"CPU": 1}])
                ray.get(pg.ready())
                return pg.id.hex()

        driver = Driver.remote()
        pg_hex = ray.get(driver.reserve.remote())
        ray.kill(driver)
        time.sleep(1)
        assert placement_group_table()[pg_hex]["state"] == "CREATED" and ray.available_resources().get("CPU", 0) == 0
        trial = types.SimpleNamespace(last_result={"placement_group": pg_hex, "epochs_done": 1})
        make_releaser().on_trial_complete(0, [], trial)
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert placement_group_table()[pg_hex]["state"] == "REMOVED" and ray.available_resources()["CPU"] == 2
        make_releaser().on_trial_error(0, [], trial)  # already removed: nothing to do
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- the sweep file


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_expands_into_valid_trials(path, shards):
    spec = load_sweep(path, [f"data.shards={shards}"])
    trials = spec.trials()
    assert len(trials) == len({t.name for t in trials}) == len(spec.points()) >= 9   # paper-mini: 3 x 3
    assert {e if isinstance(e, str) else e.kind for e in spec.ensembles} == {"scale", "distr", "greedy"}
    for t in trials:
        assert t.output_dir == spec.root_dir / t.name and t.cfg.tracking.run_name == t.name
        assert t.cfg.data.augment in ("M1", "M2", "M3")
        if t.cfg.model.backbone == "advanced_cnn":   # from scratch with its own recipe
            assert (t.cfg.model.pretrained, t.cfg.optim.name, t.cfg.data.normalize) == ("none", "adam", "half")


def test_grid_points_name_trials_and_overrides_reach_every_part(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(shards, tmp_path)
    path = write_sweep(tmp_path / "spec.yaml", rel, "runs", {
        "model": [{"name": "tiny", "model.backbone": "tiny_cnn"},
                  {"name": "tiny_adam", "model.backbone": "tiny_cnn", "optim.name": "adam", "optim.lr": 0.001}],
        "data.size": [32, 48], "seed": [0, 1]})
    spec = load_sweep(path, ["train.epochs=5", "grid.seed=[3]", "sweep.name=other", "ensembles=[scale]"])
    trials = spec.trials()
    assert [t.name for t in trials] == ["model=tiny,size=32,seed=3", "model=tiny,size=48,seed=3",
                                        "model=tiny_adam,size=32,seed=3", "model=tiny_adam,size=48,seed=3"]
    adam = trials[2].cfg
    assert (adam.optim.name, adam.optim.lr, adam.data.size, adam.seed, adam.train.epochs) == ("adam", 0.001, 32, 3, 5)
    assert trials[0].cfg.optim.name == "sgd" and spec.ensembles == ("scale",)
    # relative paths are resolved where the sweep starts, not in the Ray workers' directories
    assert Path(adam.data.shards) == Path(shards) and Path(adam.train.output_dir).is_absolute()
    assert adam.train.output_dir == str(tmp_path / "runs" / "other" / trials[2].name)
    assert adam.tracking.run_name == trials[2].name
    with pytest.raises(SweepError, match="train.output_dir cannot be swept"):
        load_sweep(path, ["grid.train.output_dir=[a, b]"])
    with pytest.raises(SweepError, match="set by grid.model and by grid.optim.name"):
        load_sweep(path, ["grid.optim.name=[sgd]"])


def test_resume_refuses_a_changed_grid_and_a_new_run_refuses_an_old_name(shards, tmp_path):
    from mlic_dist.sweep.state import check_state, write_state

    path = write_sweep(tmp_path / "st.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]})
    spec = load_sweep(path)
    spec.root_dir.mkdir(parents=True)
    write_state(spec, {}, parent_run_id="abc")
    assert check_state(load_sweep(path), resume=True)["parent_run_id"] == "abc"
    with pytest.raises(SweepError, match="already ran"):
        check_state(spec, resume=False)
    with pytest.raises(SweepError, match="grid key data.size changed"):
        check_state(load_sweep(path, ["grid.data.size=[32]"]), resume=True)
    with pytest.raises(SweepError, match="base key train.epochs changed"):
        check_state(load_sweep(path, ["train.epochs=9"]), resume=True)


def test_the_ui_hint_names_an_mlflow_the_user_can_run(tmp_path, monkeypatch):
    """`make demo` does not activate .venv: the hint must name .venv/bin/mlflow, not a bare
    `mlflow` that PATH does not find."""
    from mlic_dist.sweep import results

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mlflow").write_text("#!/bin/sh\n")
    (bin_dir / "mlflow").chmod(0o755)
    monkeypatch.setattr(results.sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    hint = results.ui_hint(None, "sqlite:////data/mlflow.db", None, "http://127.0.0.1:1", "7")
    assert hint.startswith("MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:////data/mlflow.db")
    assert hint.endswith("http://127.0.0.1:5000/#/experiments/7/runs")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")       # an activated environment
    assert results.ui_hint(None, "sqlite:////d.db", None, "u", "7").startswith("MLflow UI: mlflow ui ")


def test_a_grid_of_two_worker_trials_chooses_its_learning_rate_rule_before_anything_starts(shards, tmp_path):
    """The global-batch policy (tests/test_scale.py) for a sweep: 2 workers per trial double the
    batch of a recipe that declares 16; the sweep is refused at load, naming the trial, until
    optim.lr_scaling is chosen."""
    from mlic_dist.sweep.spec import SweepError, load_sweep

    path = write_sweep(tmp_path / "batch.yaml", shards, tmp_path / "runs", {"data.size": [32, 48]})
    doc = yaml.safe_load(path.read_text())
    doc["data"]["batch_size_per_gpu"] = 16
    doc["optim"] = {"base_batch_size": 16, "lr_scaling": "ask"}
    path.write_text(yaml.safe_dump(doc))
    assert len(load_sweep(path).trials()) == 2                        # 1 worker: the recipe's own batch
    with pytest.raises(SweepError, match=r"trial size=32 with 2 worker\(s\): global batch 32 .*optim.lr_scaling=linear"):
        load_sweep(path, ["sweep.workers_per_trial=2"])
    spec = load_sweep(path, ["sweep.workers_per_trial=2", "optim.lr_scaling=linear"])
    from mlic_dist.train import optim

    assert optim.lr_rule(spec.trials()[0].cfg, 2)["factor"] == 2.0
