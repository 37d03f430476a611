"""What a sweep does on GPU nodes and clusters, tested on simulated ones (tests/ray_cluster.py):
the trial plan with GPUs (concurrency, fractional GPUs refused where DDP cannot use them), each
trial's workers on devices of their own with LOCAL_RANK inside them, loader threads sized from
the CPUs Ray reserved, and the pre-flight check of every node's pretrained weight files."""
import time
from pathlib import Path

import pytest

from mlic_dist.sweep.spec import SweepError, load_sweep
from ray_cluster import Probe, simulated_cluster
from shard_fixtures import build_small_shards
from test_sweep import write_sweep

RAY_TIMEOUT_S = 300   # a plan that cannot place its trials makes Tune wait forever: fail instead


def _spec(tmp_path, grid, shards="/nonexistent/shards", **sweep):
    return load_sweep(write_sweep(tmp_path / "place.yaml", shards, tmp_path / "runs", grid, ensembles=(),
                                  tracking_uri="http://127.0.0.1:9", report=False, **sweep))


# --------------------------------------------------------------------------- the plan (no Ray)


def test_gpu_plans_take_the_fewer_of_gpu_and_cpu_slots_and_refuse_what_ddp_cannot_use(tmp_path):
    from mlic_dist.sweep.cluster import plan

    grid = {"seed": list(range(8))}
    two_nodes = {"CPU": 8.0, "GPU": 8.0, "trial_driver": 64.0}
    p = plan(_spec(tmp_path, grid, workers_per_trial=2), 8, two_nodes)
    assert (p.max_concurrent, p.worker_resources) == (4, {"CPU": 1.0, "GPU": 1.0})
    # CPUs bind first: 2 workers x 2 CPUs per trial on 8 CPUs is 2 trials, though 4 would fit the GPUs
    assert plan(_spec(tmp_path, grid, workers_per_trial=2, cpus_per_worker=2), 8, two_nodes).max_concurrent == 2
    # a driver reserves a CPU where no node offers trial_driver: 8 CPUs / (1 + 1) = 4 of 8 GPUs
    assert plan(_spec(tmp_path, grid), 8, {"CPU": 8.0, "GPU": 8.0}).max_concurrent == 4
    # fractions pack single-worker trials: 2 per GPU
    assert plan(_spec(tmp_path, grid, gpus_per_worker=0.5), 8, {"CPU": 16.0, "GPU": 2.0,
                                                                 "trial_driver": 9.0}).max_concurrent == 4
    for settings, says in [({"workers_per_trial": 2, "gpus_per_worker": 0.5}, "NCCL refuses"),
                           ({"gpus_per_worker": 2}, "--gpus-per-worker 1 --workers-per-trial 2"),
                           ({"workers_per_trial": 2, "gpus_per_worker": 1.5}, "--workers-per-trial 4")]:
        with pytest.raises(SweepError, match=says) as e:
            plan(_spec(tmp_path, grid, **settings), 8, two_nodes)
        assert "\n" not in str(e.value)


def test_local_rank_must_name_the_workers_own_gpu():
    from mlic_dist.sweep.tune import check_local_device, cpus_for_threads

    check_local_device(0, "0,1", ["0"])
    check_local_device(1, "2,3", ["3"])    # the second worker of the trial holding GPUs 2 and 3
    check_local_device(0, "5", ["5"])
    # 0.5 GPU per worker, 2 workers: both got GPU 0, the second would drive a device that is not there
    with pytest.raises(SweepError, match=r"LOCAL_RANK=1 .*GPU none.*\['0'\]"):
        check_local_device(1, "0", ["0"])
    # 2 GPUs per worker: worker 1 holds GPUs 2 and 3 but LOCAL_RANK 1 is GPU 1, worker 0's
    with pytest.raises(SweepError, match=r"LOCAL_RANK=1 would drive visible device 1 \(GPU 1\)"):
        check_local_device(1, "0,1,2,3", ["2", "3"])
    assert [cpus_for_threads(a) for a in ({"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 3.7}, {})] == [1, 1, 3, 1]


# --------------------------------------------------------------------------- simulated clusters


def _fit_probe(spec, probe, backend=None):
    """Every trial of `spec` on the connected cluster, each worker running `probe`; Tune's results."""
    import ray

    from mlic_dist.sweep.cluster import plan
    from mlic_dist.sweep.tune import TrialContext, make_releaser, make_tuner

    the_plan = plan(spec, len(spec.trials()), ray.cluster_resources())
    ctx = TrialContext(spec, the_plan, "http://127.0.0.1:9", None, worker=probe, backend=backend)
    return the_plan, make_tuner(ctx, [make_releaser()], resume=False).fit()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(RAY_TIMEOUT_S)
def test_two_gpu_trials_per_4_gpu_node_run_at_once_on_devices_of_their_own(tmp_path):
    """2 nodes x (4 CPUs, 4 GPUs), 4 trials x 2 workers x 1 GPU: all 4 trials run at once, 2 per
    node; on a node the two trials see disjoint devices, each worker's LOCAL_RANK indexes its own
    GPU inside CUDA_VISIBLE_DEVICES (what Accelerate's cuda:LOCAL_RANK and DALI's device_id use)."""
    from mlic_dist.sweep.cluster import connect

    spec = _spec(tmp_path, {"seed": [0, 1, 2, 3]}, workers_per_trial=2)
    probe = Probe(tmp_path / "probe", expect=8)
    t0 = time.time()
    with simulated_cluster([{"num_cpus": 4, "num_gpus": 4}] * 2) as cluster:
        connect(cluster.address)
        the_plan, grid = _fit_probe(spec, probe, backend="gloo")
    print(f"4 GPU trials on 2 simulated nodes: {time.time() - t0:.0f} s")
    assert the_plan.max_concurrent == 4 and grid.num_errors == 0, [r.error for r in grid]
    records = probe.records()
    assert len(records) == 8 and {r["peers"] for r in records} == {8}, "the 4 trials did not all run at once"
    by_node: dict = {}
    for r in records:
        assert r["assigned"] == {"CPU": 1.0, "GPU": 1.0} and len(r["gpu_ids"]) == 1
        visible = r["CUDA_VISIBLE_DEVICES"].split(",")
        assert int(r["LOCAL_RANK"]) == r["local_rank"] and visible[r["local_rank"]] == r["gpu_ids"][0], r
        assert r["threads"] == 1
        by_node.setdefault(r["node"], {}).setdefault(r["trial"], []).append(r)
    assert len(by_node) == 2 and all(len(trials) == 2 for trials in by_node.values()), by_node
    for trials in by_node.values():
        gpus = [{g for w in workers for g in w["gpu_ids"]} for workers in trials.values()]
        assert all(len(g) == 2 for g in gpus) and not gpus[0] & gpus[1], gpus     # disjoint devices
        for workers, own in zip(trials.values(), gpus):
            assert {w["CUDA_VISIBLE_DEVICES"] for w in workers} == {",".join(sorted(own, key=int))}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(RAY_TIMEOUT_S)
def test_co_located_workers_size_their_threads_from_the_cpus_ray_reserved(tmp_path):
    """A node of 2 CPUs running 2 single-worker trials at once: the threads each worker is told
    to use (MLIC_CPUS_PER_PROCESS, from its reserved CPUs) add up to at most the node's CPUs,
    where the machine's cores / LOCAL_WORLD_SIZE would give each trial all of them."""
    from mlic_dist.sweep.cluster import connect

    spec = _spec(tmp_path, {"seed": [0, 1]})
    probe = Probe(tmp_path / "probe", expect=2)
    with simulated_cluster([{"num_cpus": 2}]) as cluster:
        connect(cluster.address)
        _, grid = _fit_probe(spec, probe)
    assert grid.num_errors == 0, [r.error for r in grid]
    records = probe.records()
    assert len(records) == 2 and {r["peers"] for r in records} == {2}, "the 2 trials did not run at once"
    assert len({r["node"] for r in records}) == 1 and all(r["assigned"] == {"CPU": 1.0} for r in records)
    assert all(r["threads"] is not None for r in records), \
        "MLIC_CPUS_PER_PROCESS unset: each trial's trainer would take the machine's cores / LOCAL_WORLD_SIZE (1)"
    assert sum(r["threads"] for r in records) <= 2, records


@pytest.mark.dist
@pytest.mark.timeout(RAY_TIMEOUT_S)
def test_preflight_names_every_node_missing_a_weight_file_before_any_trial(tmp_path):
    """Per-node TORCH_HOME: node A has both backbones' ImageNet files, node B only one, the head
    (drivers only, no CPU for a worker) none. One error, one line for B's missing file and the
    fix; no trial started."""
    import ray
    from torchvision.models import get_model_weights

    from mlic_dist.models import hub_checkpoint_path
    from mlic_dist.sweep.run import run_sweep

    shards = build_small_shards(tmp_path / "data", n_train=8, n_val=4, n_test=4)
    files = {b: Path(hub_checkpoint_path(get_model_weights(b).DEFAULT)).name for b in ("resnet18", "mobilenet_v2")}
    homes = {}
    for node, backbones in (("head", ()), ("a", ("resnet18", "mobilenet_v2")), ("b", ("resnet18",))):
        homes[node] = tmp_path / f"torch-{node}"
        (homes[node] / "hub" / "checkpoints").mkdir(parents=True)
        for b in backbones:   # the check looks for the file only: an empty one stands for it
            (homes[node] / "hub" / "checkpoints" / files[b]).touch()
    spec = _spec(tmp_path, {"model.backbone": ["resnet18", "mobilenet_v2"]}, shards=shards)
    spec = load_sweep(spec.source, ["model.pretrained=imagenet"])
    nodes = [{"num_cpus": 0, "env_vars": {"TORCH_HOME": str(homes["head"])}},
             {"num_cpus": 1, "env_vars": {"TORCH_HOME": str(homes["a"])}},
             {"num_cpus": 1, "env_vars": {"TORCH_HOME": str(homes["b"])}}]
    with simulated_cluster(nodes) as cluster:
        with pytest.raises(SweepError) as e:
            run_sweep(spec, address=cluster.address)
        assert not ray.is_initialized()
    lines = str(e.value).splitlines()
    missing = str(homes["b"] / "hub" / "checkpoints" / files["mobilenet_v2"])
    assert len(lines) == 3 and lines[0].startswith("pre-flight: 1 problem(s)"), lines
    assert missing in lines[1] and "model.backbone=mobilenet_v2" in lines[1]
    assert lines[2].startswith("fix: ") and "python -m mlic_dist.models" in lines[2] and "TORCH_HOME" in lines[2]
    assert not any((spec.root_dir / t.name).exists() for t in spec.trials())


def test_a_local_sweep_checks_the_weight_files_here_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from mlic_dist.sweep.run import run_sweep

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    shards = build_small_shards(tmp_path / "data", n_train=8, n_val=4, n_test=4)
    spec = _spec(tmp_path, {"model.backbone": ["resnet18", "mobilenet_v2"]}, shards=shards)
    spec = load_sweep(spec.source, ["model.pretrained=imagenet"])
    with pytest.raises(SweepError) as e:
        run_sweep(spec)
    lines = str(e.value).splitlines()
    assert len(lines) == 4 and "2 pretrained weight file(s) missing" in lines[0] and lines[3].startswith("fix: ")
    assert [ln.split("model.backbone=")[1].split()[0] for ln in lines[1:3]] == ["mobilenet_v2", "resnet18"]
    assert all(str(tmp_path / "empty-torch-home" / "hub" / "checkpoints") in ln for ln in lines[1:3])
    assert not ray.is_initialized() and not spec.root_dir.exists()
