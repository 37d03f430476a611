"""What only shows with many GPUs and several nodes, simulated on this CPU machine (tests/scale.py):
each rank's own randomness, the global batch and its learning rates, a run directory that one
node does not share."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scale import private_mounts_work, torchrun, two_nodes
from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]

# build_run, then the dropout mask the first training step would draw, on every rank
MASK_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from mlic_dist.config import load_config
    from mlic_dist.train.loop import build_run
    run = build_run(load_config(None, sys.argv[2:]))
    mask = torch.nn.functional.dropout(torch.ones(4096), 0.5, training=True) > 0
    np.save(f"{sys.argv[1]}/mask-{run.accelerator.process_index}-{run.accelerator.num_processes}.npy", mask.numpy())
""")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=48, n_val=12, n_test=0,
                              num_classes=4, samples_per_shard=6)


def _overrides(shards, out, **extra):
    return tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 1,
                                              "data.batch_size_per_gpu": 4, **extra})


@pytest.mark.dist
def test_each_rank_draws_its_own_dropout_masks(shards, tmp_path, free_port):
    """Two ranks, the same seed: the masks of one step differ between ranks (before, every rank
    seeded the same stream and drew the same mask), and replay exactly in a second launch."""
    probe = tmp_path / "probe.py"
    probe.write_text(MASK_PROBE)
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        p = torchrun([probe, out, *_overrides(shards, tmp_path / f"run-{attempt}")], 2, free_port, tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    a0, a1, b0 = (np.load(tmp_path / d / f"mask-{r}-2.npy") for d, r in (("a", 0), ("a", 1), ("b", 0)))
    assert (a0 != a1).mean() > 0.3              # independent masks disagree on ~half the units
    assert np.array_equal(a0, b0)               # seeded: the same launch draws the same
    assert np.array_equal(a1, np.load(tmp_path / "b" / "mask-1-2.npy"))


@pytest.mark.dist
@pytest.mark.slow
def test_the_global_batch_never_changes_the_recipe_silently(shards, tmp_path, free_port):
    """4 processes x 4 = a global batch of 16 runs the recipe as tuned; 4 x 8 = 32 against the
    recipe's base_batch_size 16 is refused until a rule is chosen; linear scaling is applied and
    recorded in metrics.json (and with it the effective learning rates)."""
    recipe = ["--config", ROOT / "configs/recipes/wang.yaml"]
    refused = torchrun(["-m", "mlic_dist.train", *recipe,
                        *_overrides(shards, tmp_path / "r1", **{"data.batch_size_per_gpu": 8, "optim.lr_scaling": "ask"})],
                       4, free_port, tmp_path)
    assert refused.returncode != 0
    assert "global batch 32" in refused.stderr and "optim.base_batch_size=16" in refused.stderr
    assert "optim.lr_scaling=linear" in refused.stderr and "data.batch_size_per_gpu=4" in refused.stderr
    assert not (tmp_path / "r1" / "checkpoints").exists()       # refused before any training
    scaled = torchrun(["-m", "mlic_dist.train", *recipe,
                       *_overrides(shards, tmp_path / "r2", **{"data.batch_size_per_gpu": 8,
                                                               "optim.lr_scaling": "linear"})],
                      4, free_port + 1, tmp_path)
    assert scaled.returncode == 0, scaled.stderr[-3000:]
    rule = json.loads((tmp_path / "r2" / "metrics.json").read_text())["learning_rates"]
    assert rule == {"global_batch_size": 32, "base_batch_size": 16, "lr_scaling": "linear", "factor": 2.0,
                    "lr": pytest.approx(0.02), "head_lr": pytest.approx(0.2), "warmup_epochs": 0.0}
    assert "x 32/16" in scaled.stdout


def test_the_batch_rule_in_one_process(shards):
    """The same rules without processes: one process at the declared batch runs unchanged."""
    from mlic_dist.config import ConfigError, load_config
    from mlic_dist.train import optim

    cfg = load_config(ROOT / "configs/recipes/wang.yaml", ["data.batch_size_per_gpu=16"])
    optim.check_batch_policy(cfg, 1)
    assert optim.lr_rule(cfg, 1)["factor"] == 1.0 and optim.group_lrs(cfg, 1) == {"backbone": 0.01, "head": 0.1}
    with pytest.raises(ConfigError, match=r"global batch 128 = .* x 8 process.*base_batch_size=16.*batch_size_per_gpu=2"):
        optim.check_batch_policy(cfg, 8)
    none = load_config(ROOT / "configs/recipes/wang.yaml", ["optim.lr_scaling=none"])
    optim.check_batch_policy(none, 8)
    assert optim.group_lrs(none, 8) == {"backbone": 0.01, "head": 0.1}
    free = load_config(None, [])                     # no batch declared: no rule to choose
    optim.check_batch_policy(free, 8)


@pytest.mark.dist
@pytest.mark.skipif(not private_mounts_work(), reason="needs a private mount namespace (unshare -m, root)")
def test_a_node_that_does_not_share_the_output_dir_is_named_at_start(shards, tmp_path, free_port):
    """Two nodes on 127.0.0.1; node 1 sees its own empty directory where train.output_dir lives.
    Before, node 1's rank failed with FileNotFoundError at the first checkpoint and rank 0 hung at
    the barrier; now both stop at start with one line naming node 1."""
    runs = tmp_path / "runs"
    runs.mkdir()
    node0, node1 = two_nodes(["-m", "mlic_dist.train", *_overrides(shards, runs / "r")], free_port, tmp_path,
                             private=[runs], timeout=240)
    for node in (node0, node1):
        assert node.returncode != 0
        assert "is not shared by every process: rank 1 on node 1" in node.stderr, node.stderr[-3000:]
    assert not (runs / "r" / "checkpoints").exists()


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_one_rank_sees_a_new_order_every_epoch_beyond_the_shuffle_buffer(tmp_path, loader):
    """One rank, a 16-sample shuffle buffer, 20 tars: before, epoch 1 replayed epoch 0's order up
    to the buffer (Spearman ~0.99, as COCO's 82k images on one GPU); the tar order permuted per
    seed and epoch decorrelates it, and an epoch replays exactly (resume)."""
    from scipy.stats import spearmanr

    from mlic_dist.config import DataConfig
    from mlic_dist.data import build_loader

    shards = build_small_shards(tmp_path, n_train=120, n_val=6, n_test=0, num_classes=4, samples_per_shard=6)
    cfg = DataConfig(shards=str(shards), size=16, loader=loader, batch_size_per_gpu=8, shuffle_buffer=16,
                     num_workers=1, augment="M0")
    ld = build_loader(cfg, "train", train=True, rank=0, world_size=1, seed=0)

    def order(epoch):
        ld.set_epoch(epoch)
        return [int(i) for b in ld for i in b.ids]

    e0 = order(0)
    at_e1 = ld.state_dict()                       # what a checkpoint taken now keeps
    e1 = order(1)
    assert sorted(e0) == sorted(e1) == list(range(120))
    rho = spearmanr([e0.index(i) for i in range(120)], [e1.index(i) for i in range(120)]).statistic
    assert rho < 0.5, rho
    resumed = build_loader(cfg, "train", train=True, rank=0, world_size=1, seed=0)
    resumed.load_state_dict(at_e1)
    resumed.set_epoch(1)
    assert [int(i) for b in resumed for i in b.ids] == e1
    fixed = build_loader(DataConfig(**{**cfg.__dict__, "shard_shuffle": False}), "train", train=True, rank=0,
                         world_size=1, seed=0)
    fixed.set_epoch(0)
    f0 = [int(i) for b in fixed for i in b.ids]
    fixed.set_epoch(1)
    f1 = [int(i) for b in fixed for i in b.ids]
    assert spearmanr([f0.index(i) for i in range(120)], [f1.index(i) for i in range(120)]).statistic > 0.8


@pytest.mark.dist
def test_each_node_logs_its_own_system_metrics_into_the_one_run(shards, tmp_path, free_port):
    """Two simulated nodes, one rank each: node 1 has no MLflow run of its own; it reads rank 0's
    run id from the shared run directory and MLflow's sampler logs system/node1/... beside
    node 0's system/node0/..."""
    from mlflow.tracking import MlflowClient

    from mlic_dist.tracking.store import init_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_sqlite_store(uri)
    overrides = _overrides(shards, tmp_path / "r", **{
        "tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": "nodes", "train.epochs": 12,
        "tracking.system_metrics_interval_s": 0.2, "tracking.log_artifacts": False})
    node0, node1 = two_nodes(["-m", "mlic_dist.train", *overrides], free_port, tmp_path, timeout=300)
    assert node0.returncode == node1.returncode == 0, node0.stderr[-2000:] + node1.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert not any(k.startswith("system/cpu") for k in run.data.metrics)    # every sample names its node
