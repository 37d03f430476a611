"""Sweep efficiency: how much of the trial slots a real sweep keeps busy, and where the rest goes.

    python bench/sweep.py                                       # 8 trials on this machine (CPU)
    python bench/sweep.py --out bench/results/sweep-cpu.json    # record it
    python bench/sweep.py --trials 16 --epochs 4 --workers-per-trial 2 --gpus-per-worker 1   # a GPU box

It runs `mlic_dist.sweep.run.run_sweep` exactly as `python launch/sweep.py` does on one machine
(Ray started here, a local SQLite store served by an mlflow server, Tune + Ray Train trials of
`train(cfg)`, ensembles and report when they exist) over small synthetic shards, with a Tune
callback that times each trial. With K trials at once and wall = the whole run_sweep call:
  slot efficiency   = sum(trial slot) / (wall x K)   trial slot = Tune trial start -> complete
                                                      (target >= 90%)
  train efficiency  = sum(train()) / (wall x K)      train() time from each trial's train.log
and the slot-seconds (wall x K) are split into: startup (validation, the MLflow server and Ray,
started side by side: `sweep_timings_s` has each), per-trial overhead inside the slots (Ray Train
controller and worker actors, process group, imports: slot - train()), idle slots (between
trials, waiting for the last ones) and the end (ensembles, report, shutdown). The grid: data.size x data.augment x seed, tiny_cnn from scratch (--model: any registry name).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from trainer import machine_info, now_iso, write_result  # noqa: E402  (bench/trainer.py)

TARGET_SLOT_EFFICIENCY = 0.90


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="grid points (a multiple of 4)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per epoch (train.max_steps_per_epoch)")
    p.add_argument("--model", default="tiny_cnn")
    p.add_argument("--size", type=int, default=64, help="the grid's sizes are SIZE and SIZE+16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--max-concurrent", type=int, default=0)
    p.add_argument("--work", help="directory for shards, runs and the MLflow store (default: a temp dir)")
    p.add_argument("--out", help="write the result JSON here (e.g. bench/results/sweep-cpu.json)")
    a = p.parse_args(argv)
    if a.trials < 4 or a.trials % 4:
        p.error("--trials must be a multiple of 4 (sizes x augmentations x seeds)")
    return a


class Tee(io.StringIO):
    """The sweep's output, printed as it comes and kept for parsing."""

    def write(self, text):
        sys.stdout.write(text)
        return super().write(text)

    def flush(self):
        sys.stdout.flush()


def make_timer():
    from ray import tune

    class TrialTimer(tune.Callback):
        """Wall-clock start and end of every trial, as Tune sees them (the driver's lifetime)."""

        def __init__(self):
            self.start: dict[str, float] = {}
            self.end: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start.setdefault(str(trial), time.time())

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[str(trial)] = time.time()

        on_trial_error = on_trial_complete

    return TrialTimer()


def write_sweep_file(work: Path, shards: Path, a) -> Path:
    import yaml

    doc = {
        "data": {"shards": str(shards), "loader": "torch", "batch_size_per_gpu": a.batch, "num_workers": 1},
        "model": {"backbone": a.model, "pretrained": "none"},
        "optim": {"lr": 0.01, "head_lr": 0.1},
        "train": {"epochs": a.epochs, "max_steps_per_epoch": a.steps, "mixed_precision": "no"},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-sweep"},
        "grid": {"data.size": [a.size, a.size + 16], "data.augment": ["M1", "M2"],
                 "seed": list(range(a.trials // 4))},
        "ensembles": ["scale", "distr", "greedy"],
        "sweep": {"name": "bench", "root": str(work / "runs"), "workers_per_trial": a.workers_per_trial,
                  "max_concurrent": a.max_concurrent, "progress_every_s": 60,
                  **({"gpus_per_worker": a.gpus_per_worker} if a.gpus_per_worker is not None else {})},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main(argv=None) -> dict:
    a = parse_args(argv)
    from shard_fixtures import build_small_shards

    from mlic_dist.sweep.run import run_sweep
    from mlic_dist.sweep.spec import load_sweep

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    n_train = a.steps * a.batch * a.workers_per_trial
    shards = build_small_shards(work, n_train=n_train, n_val=64, n_test=64, num_classes=6,
                                image_size=(96, 72), samples_per_shard=64)
    spec = load_sweep(write_sweep_file(work, shards, a))
    timer = make_timer()
    log = Tee()
    t0 = time.time()
    rc = run_sweep(spec, out=log, callbacks=[timer])
    wall = time.time() - t0
    timings = json.loads((spec.root_dir / "timings.json").read_text())
    k = int(re.search(r"(\d+) trial\(s\) at once", log.getvalue()).group(1))
    trials = []
    for t in spec.trials():
        text = (t.output_dir / "train.log").read_text()
        train_s = sum(float(x) for x in re.findall(r"train\(\) ended after ([\d.]+) s", text))
        trials.append({"trial": t.name, "slot_s": round(timer.end[t.name] - timer.start[t.name], 2),
                       "train_s": round(train_s, 2)})
    slots = wall * k
    sum_slot = sum(t["slot_s"] for t in trials)
    sum_train = sum(t["train_s"] for t in trials)
    first_start, last_end = min(timer.start.values()), max(timer.end.values())
    setup_s = first_start - t0                      # validation, MLflow server, Ray, Tuner start
    end_s = wall - (last_end - t0)                  # ensembles, report, shutdown
    breakdown = {
        "train": sum_train,
        "per_trial_overhead_in_slots": sum_slot - sum_train,
        # validation, then the MLflow server and Ray started side by side, the parent run, Tuner
        "startup": setup_s * k,
        "idle_slots_between_trials": (last_end - first_start) * k - sum_slot,
        "end (ensembles, report, shutdown)": end_s * k,
    }
    result = {
        "benchmark": "sweep_efficiency", "date": now_iso(), "machine": machine_info(),
        "settings": {k_: v for k_, v in vars(a).items() if k_ not in ("out", "work")},
        "exit_code": rc, "trials_at_once": k, "wall_s": round(wall, 1),
        "slot_efficiency": round(sum_slot / slots, 4), "train_efficiency": round(sum_train / slots, 4),
        "target_slot_efficiency": TARGET_SLOT_EFFICIENCY, "pass": sum_slot / slots >= TARGET_SLOT_EFFICIENCY,
        "slot_seconds": round(slots, 1),
        "breakdown_slot_s": {k_: round(v, 1) for k_, v in breakdown.items()},
        "breakdown_pct": {k_: round(100 * v / slots, 1) for k_, v in breakdown.items()},
        "mean_per_trial_overhead_s": round((sum_slot - sum_train) / len(trials), 1),
        "sweep_timings_s": {k_: round(v, 1) for k_, v in timings.items()},
        "trials": trials,
    }
    return write_result(result, a.out)


if __name__ == "__main__":
    main()
