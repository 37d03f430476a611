"""configs/accelerate/*.yaml: each loads with accelerate's own config loader and resolves, through
`accelerate launch`'s own argument handling, to the launch it documents; cpu.yaml trains a tiny run."""
import subprocess
import sys
from pathlib import Path

import pytest

from shard_fixtures import build_small_shards
from test_train import assert_run_dir, overrides, run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG_DIR = ROOT / "configs/accelerate"

# file -> (distributed, processes in total, machines, mixed precision, CPU only)
EXPECTED = {
    "cpu.yaml": ("NO", 1, 1, "no", True),
    "1gpu.yaml": ("NO", 1, 1, "bf16", False),
    "1node-8gpu.yaml": ("MULTI_GPU", 8, 1, "bf16", False),
    "2node-8gpu.yaml": ("MULTI_GPU", 16, 2, "bf16", False),
}


def test_the_directory_holds_the_documented_files():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    distributed, processes, machines, precision, cpu = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIG_DIR / name))   # raises on unknown keys
    assert isinstance(cfg, ClusterConfig)
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == (distributed, processes, machines)
    assert (cfg.mixed_precision, cfg.use_cpu) == (precision, cpu)
    assert cfg.num_processes % cfg.num_machines == 0   # the same GPU count on every node


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resolves_to_the_documented_launch(name):
    """What `accelerate launch --config_file FILE -m mlic_dist.train` would run, computed by
    accelerate's own parser and validation (no GPU needed to resolve, only to run)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    distributed, processes, machines, precision, cpu = EXPECTED[name]
    argv = ["--config_file", str(CONFIG_DIR / name), "-m", "mlic_dist.train", "--config", "x.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.multi_gpu == (distributed == "MULTI_GPU")
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, precision)
    assert args.training_script_args == ["--config", "x.yaml"]
    if machines > 1:
        assert args.main_process_ip and args.main_process_port and args.machine_rank == 0
    # the machine rank a second node passes on its command line wins over the file's 0
    if machines > 1:
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
            ["--config_file", str(CONFIG_DIR / name), "--machine_rank", "1", "-m", "mlic_dist.train"]))
        assert args.machine_rank == 1 and args.num_processes == processes


@pytest.mark.parametrize("flags, name", [
    (["--multi_gpu", "--num_processes", "8"], "1node-8gpu.yaml"),
    (["--multi_gpu", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "10.0.0.1",
      "--main_process_port", "29500", "--num_processes", "16"], "2node-8gpu.yaml"),
], ids=["1node-8gpu", "2node-8gpu"])
def test_the_readmes_flag_only_launches_match_the_files(flags, name):
    """The README's `accelerate launch --multi_gpu ...` lines (no config file) resolve to the same
    processes, machines and rendezvous as the config file of that setup; precision aside (without
    a file accelerate's default is "no"; train.mixed_precision still applies inside train())."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    def resolve(argv):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
            [*argv, "-m", "mlic_dist.train", "--config", "x.yaml"]))
        several = args.num_machines > 1   # one node: accelerate picks a free local port itself
        return (args.multi_gpu, args.num_processes, args.num_machines, args.training_script_args,
                (args.machine_rank, args.main_process_ip, args.main_process_port) if several else None)

    assert resolve(flags) == resolve(["--config_file", str(CONFIG_DIR / name)])


def test_accelerate_launch_with_cpu_yaml_trains(tmp_path):
    shards = build_small_shards(tmp_path / "data", n_train=24, n_val=8, n_test=8, num_classes=4,
                                samples_per_shard=9)
    out = tmp_path / "run"
    p = run_cli([str(BIN / "accelerate"), "launch", "--config_file", str(CONFIG_DIR / "cpu.yaml"),
                 "-m", "mlic_dist.train", "--config", str(ROOT / "configs/recipes/wang.yaml"),
                 *overrides(shards, out, **{"train.epochs": 1, "tracking.enabled": False})], cwd=tmp_path)
    assert_run_dir(out, 8, 8)
    # Without a config file accelerate warns that it guessed these; the file supplies them all.
    assert "were not passed to `accelerate launch`" not in p.stderr, p.stderr[-2000:]
    # the control: the same launch without the file does warn (so the check above can fail)
    q = subprocess.run([str(BIN / "accelerate"), "launch", "-m", "mlic_dist.train", "--help"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={"PATH": str(BIN), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
                            "HF_HOME": str(tmp_path / "hf")})
    assert "were not passed to `accelerate launch`" in q.stderr, q.stderr[-2000:]
