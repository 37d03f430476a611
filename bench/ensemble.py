"""Greedy ensemble selection at COCO scale: 27 members x 40,000 validation images x 80 classes.

    python bench/ensemble.py                                   # prints the JSON
    python bench/ensemble.py --out bench/results/ensemble-cpu.json
    python bench/ensemble.py --members 9 --images 5000         # smaller

Target (issue #10): `ensemble_selection.greedy_select` with the CLI defaults (sorted init of 3,
20 forward steps, i.e. 27 x 20 + 3 mAP evaluations) finishes within 60 s on 2 cores. Also
recorded: one mAP evaluation by `metrics.FastAP` vs sklearn (`metrics.average_precision`), the
largest difference between the two (they must agree to 1e-9), and one `ensemble.members.fuse`.

Data: synthetic but COCO-shaped. Per-class positive rates from 0.5 % to 8 % plus one dense
class at 45 % ("person"), about 2.9 labels per image like COCO; member m scores
sigmoid(q_m * (2y - 1) + shared noise + own noise - 2), float32, with qualities q_m in [1, 2.5]:
members of uneven skill whose errors partly differ, so selection has work to do. The machine and
its load are recorded, and the process CPU time beside the wall time (a loaded machine stretches
the wall time; CPU seconds / cores is what a quiet machine would take).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from mlic_dist import metrics  # noqa: E402
from mlic_dist.ensemble.selection import greedy_select  # noqa: E402
from mlic_dist.ensemble.members import fuse  # noqa: E402
from trainer import machine_info, now_iso  # noqa: E402

TARGET_S = 60.0


def make_data(members: int, images: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rates = np.concatenate([[0.45], rng.uniform(0.005, 0.06, classes - 1)])          # (C,)
    targets = (rng.random((images, classes)) < rates).astype(np.int8)                # (N, C)
    signs = 2.0 * targets - 1.0
    shared = rng.normal(0.0, 1.0, (images, classes))     # what every member gets wrong alike
    scores = []
    for m in range(members):
        q = 1.0 + 1.5 * m / max(1, members - 1)
        logits = q * signs + shared + rng.normal(0.0, 1.2, (images, classes)) - 2.0
        scores.append((1.0 / (1.0 + np.exp(-logits))).astype(np.float32))          # (N, C)
    return scores, targets


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=27)
    p.add_argument("--images", type=int, default=40000)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--init", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="sort threads (default: the usable cores)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    machine = machine_info()
    scores, targets = make_data(args.members, args.images, args.classes)
    one = scores[0]
    t_sklearn, ap_ref = timed(lambda: metrics.average_precision(one, targets))
    fast = metrics.FastAP(targets, args.threads)
    by_class = np.ascontiguousarray(one.T)
    t_fast, ap_fast = timed(lambda: fast(by_class), repeats=5)
    t_fuse, _ = timed(lambda: fuse(scores), repeats=2)
    cpu0 = time.process_time()
    t_greedy, g = timed(lambda: greedy_select(scores, targets, init=args.init, steps=args.steps, threads=args.threads))
    cpu_greedy = time.process_time() - cpu0
    evaluations = args.members + (min(args.init, args.members) - 1) + args.members * args.steps
    result = {
        "benchmark": "greedy_ensemble_selection",
        "date": now_iso(),
        "machine": machine,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {"members": args.members, "images": args.images, "classes": args.classes,
                     "init": args.init, "steps": args.steps, "threads": fast.threads,
                     "labels_per_image": round(float(targets.sum(1).mean()), 2), "numpy": np.__version__},
        "map_eval_s": {"sklearn": round(t_sklearn, 4), "fast": round(t_fast, 4),
                       "speedup": round(t_sklearn / t_fast, 1)},
        "fast_vs_sklearn_max_abs_diff": float(np.nanmax(np.abs(ap_fast - ap_ref))),
        "fuse_all_members_s": round(t_fuse, 3),
        "greedy": {"seconds": round(t_greedy, 2), "cpu_seconds": round(cpu_greedy, 2), "map_evaluations": evaluations,
                   "ms_per_evaluation": round(1000 * t_greedy / evaluations, 1),
                   "selected_members": int((g.counts > 0).sum()), "ensemble_size": int(g.counts.sum()),
                   "best_step": g.best_step, "val_mAP_best_single": round(g.trajectory[0]["val_mAP"], 5),
                   "val_mAP_ensemble": round(g.trajectory[g.best_step]["val_mAP"], 5)},
        "target_s": TARGET_S,
        "pass": t_greedy <= TARGET_S,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
