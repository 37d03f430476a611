"""The paper's claims, measured on a miniature of its experiment over seeds: `make bench-paper`.

Runs configs/sweeps/paper-mini.yaml (MobileNetV2 pretrained on the demo's scenes, sizes 112 / 128
/ 144 px, about 15% apart like the paper's 384 / 448 / 512, x {M1, M2, M3}; each trial trained
until validation mAP stops improving (early stopping); then the paper's Table 3 ensembles,
ScaleEn = the three sizes of M3, DistrEn = M2 + M3 at 144 px, and greedy) once per seed, each
seed its own sweep `paper-s<seed>` with its own ensembles, then writes
  bench/results/paper-mini-cpu.json   every trial's and every ensemble's val / test mAP, per seed
  bench/results/paper-mini-cpu.md     the tables: each setting mean +- std over seeds; best single
                                 (chosen on val) vs ScaleEn vs DistrEn vs greedy on test; and each
                                 of the paper's claims with its spread and a verdict

    python bench/paper.py                                   # 3 seeds, about an hour or more on 2 CPU cores
    python bench/paper.py --dry-run                         # the plan of every seed's sweep; runs nothing
    python bench/paper.py --config configs/sweeps/demo.yaml # the demo's grid instead (96/128 px, 3 epochs)
    python bench/paper.py --tables-only                     # re-read the sweeps, rewrite the tables

A seed whose sweep finished (its report exists) is read, not rerun; one that was interrupted is
resumed. A claim "holds" when the 95% t-interval of its paired differences over seeds (and
settings) lies above 0, is "contradicted" when below, and is "inside the noise" otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

KINDS = {"scale": "ScaleEn", "distr": "DistrEn", "greedy": "greedy"}


# --------------------------------------------------------------------------- running


def run_seed(seed: int, args, shards: Path) -> Path:
    """The sweep of one seed (run, resumed or reused); returns its directory."""
    from mlic_dist.sweep.run import run_sweep
    from mlic_dist.sweep.spec import load_sweep

    spec = load_sweep(args.config, [f"data.shards={shards}", f"seed={seed}", f"sweep.name=paper-s{seed}",
                                    *args.overrides])
    root = spec.root_dir
    if (root / "report").is_dir() and any((root / "ensembles").glob("*/ensemble.json")):
        print(f"seed {seed}: {root} finished, read as it is", flush=True)
        return root
    resume = (root / "sweep.json").is_file()
    print(f"seed {seed}: {'resuming' if resume else 'running'} sweep {spec.name} ({len(spec.trials())} trials)",
          flush=True)
    rc = run_sweep(spec, resume=resume)
    if rc not in (0, 1):
        raise SystemExit(f"seed {seed}: the sweep stopped (exit {rc}); rerun this command to resume it")
    return root


# --------------------------------------------------------------------------- reading


def read_sweep(root: Path) -> dict:
    """{"seed", "trials": [{name, backbone, size, augment, val, test}], "ensembles": [{name, kind, group,
    members, val, test}]} from a sweep directory (run directories via mlic_dist.rundir)."""
    from mlic_dist import rundir
    from mlic_dist.config import flatten

    trials, ensembles, seeds = [], [], set()
    for d in sorted(p for p in root.iterdir() if (p / rundir.METRICS).is_file()):
        run = rundir.load_run(d)
        c = flatten(run.config)
        seeds.add(c.get("seed"))
        trials.append({"name": d.name, "backbone": c["model.backbone"], "size": c["data.size"],
                       "augment": c["data.augment"], "val": run.metrics["val"]["mAP"],
                       "test": run.metrics["test"]["mAP"], "best_epoch": run.metrics.get("best_epoch"),
                       "epochs_run": run.metrics.get("epochs_run")})
    for d in sorted((root / "ensembles").glob("*/")):
        if not (d / "ensemble.json").is_file():
            continue
        run = rundir.load_run(d)
        doc = run.ensemble
        group = (doc.get("group") or {}).get("config", {})
        ensembles.append({"name": d.name, "kind": doc.get("kind"), "members": len(doc.get("members", [])),
                          "member_names": [m.get("name") for m in doc.get("members", [])],
                          "backbone": group.get("model.backbone"), "size": group.get("data.size"),
                          "augment": group.get("data.augment"),
                          "val": run.metrics["val"]["mAP"], "test": run.metrics["test"]["mAP"]})
    if len(seeds) != 1:
        raise SystemExit(f"{root}: its trials have seeds {sorted(seeds, key=str)}; one sweep per seed expected")
    return {"dir": str(root), "seed": seeds.pop(), "trials": trials, "ensembles": ensembles}


# --------------------------------------------------------------------------- statistics


def stats(values: list[float]) -> dict:
    """mean, sample std, n and the 95% t-interval of the mean."""
    from scipy import stats as st

    v = [x for x in values if x == x]
    n = len(v)
    mean = sum(v) / n if n else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    half = float(st.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else float("inf")
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half]}


def verdict(s: dict) -> str:
    if s["n"] < 2:
        return "one sample: no verdict"
    lo, hi = s["ci95"]
    return "holds" if lo > 0 else "contradicted" if hi < 0 else "inside the noise"


def pm(s: dict, scale: float = 100.0) -> str:
    return f"{scale * s['mean']:.2f} ± {scale * s['std']:.2f}"


def analyse(sweeps: list[dict]) -> dict:
    seeds = [s["seed"] for s in sweeps]
    settings = {}
    for s in sweeps:
        for t in s["trials"]:
            settings.setdefault((t["backbone"], t["size"], t["augment"]), []).append(t)
    setting_rows = [{"backbone": b, "size": z, "augment": a, "seeds": len(ts),
                     "val": stats([t["val"] for t in ts]), "test": stats([t["test"] for t in ts])}
                    for (b, z, a), ts in sorted(settings.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]

    # Per seed: the best single trial chosen on validation, and per ensemble kind the ensemble
    # chosen on validation; each compared on test with that seed's best single.
    per_seed, methods = [], {"best single (val)": []}
    for s in sweeps:
        single = max(s["trials"], key=lambda t: t["val"])
        row = {"seed": s["seed"], "best single": single["name"], "best single test": single["test"]}
        methods["best single (val)"].append(single)
        for kind, title in KINDS.items():
            es = [e for e in s["ensembles"] if e["kind"] == kind]
            if es:
                best = max(es, key=lambda e: e["val"])
                methods.setdefault(title, []).append({**best, "gain": best["test"] - single["test"]})
                row[f"{title}"] = best["name"]
                row[f"{title} test"] = best["test"]
        per_seed.append(row)
    method_rows = []
    for title, picks in methods.items():
        r = {"method": title, "val": stats([p["val"] for p in picks]), "test": stats([p["test"] for p in picks]),
             "picked": [p["name"] for p in picks]}
        if "gain" in picks[0]:
            r["gain vs best single"] = stats([p["gain"] for p in picks])
        method_rows.append(r)

    # The claims, as paired differences (same seed, same other settings).
    def paired(vary: str, better, worse, within=lambda key: True) -> dict:
        diffs = []
        for s in sweeps:
            by = {(t["backbone"], t["size"], t["augment"]): t["test"] for t in s["trials"]}
            for (b, z, a), v in by.items():
                key = {"backbone": b, "size": z, "augment": a}
                if key[vary] != better or not within(key):
                    continue
                other = {**key, vary: worse}
                w = by.get((other["backbone"], other["size"], other["augment"]))
                if w is not None:
                    diffs.append(v - w)
        return stats(diffs)

    backbones = sorted({k[0] for k in settings})
    sizes = sorted({k[1] for k in settings})
    claims = []
    for title in KINDS.values():
        if title in methods:
            s = stats([p["gain"] for p in methods[title]])
            claims.append({"claim": f"{title} beats the best single model (test mAP, chosen on val)",
                           "difference": s, "verdict": verdict(s)})
    for b in backbones:
        for aug in ("M2", "M3"):
            s = paired("augment", aug, "M1", lambda k, b=b: k["backbone"] == b)
            claims.append({"claim": f"{aug} beats M1 ({b}; paired over sizes and seeds)", "difference": s,
                           "verdict": verdict(s)})
        if len(sizes) > 1:
            s = paired("size", sizes[-1], sizes[0], lambda k, b=b: k["backbone"] == b)
            claims.append({"claim": f"{sizes[-1]} px beats {sizes[0]} px ({b}; paired over augmentations and seeds)",
                           "difference": s, "verdict": verdict(s)})
    if len(backbones) == 2 and "mobilenet_v2" in backbones:
        other = next(b for b in backbones if b != "mobilenet_v2")
        s = paired("backbone", "mobilenet_v2", other)
        claims.append({"claim": f"pretrained mobilenet_v2 beats {other} from scratch (paired over sizes, "
                                f"augmentations and seeds)", "difference": s, "verdict": verdict(s)})
    return {"seeds": seeds, "settings": setting_rows, "methods": method_rows, "per_seed": per_seed,
            "claims": claims}


# --------------------------------------------------------------------------- output


def markdown(a: dict, meta: dict) -> str:
    m = meta["machine"]
    lines = [f"# The paper's claims on the demo's scenes ({len(a['seeds'])} seeds: {', '.join(map(str, a['seeds']))})",
             "",
             f"Machine: {m.get('cpu_model')} x{m.get('cpu_count')}, GPU {m.get('gpu') or 'none'}; "
             f"{meta['date']}; wall time {meta['wall_min']:.0f} min for the seeds run here. "
             f"mAP in percent, mean ± sample std over seeds.", "",
             "## Each setting", "", "| backbone | size | augment | seeds | val mAP | test mAP |",
             "|---|---:|---|---:|---:|---:|"]
    for r in a["settings"]:
        lines.append(f"| {r['backbone']} | {r['size']} | {r['augment']} | {r['seeds']} | {pm(r['val'])} | {pm(r['test'])} |")
    lines += ["", "## Best single model vs the ensembles (each chosen on validation, per seed)", "",
              "| method | val mAP | test mAP | test gain vs best single | picked (per seed) |", "|---|---:|---:|---:|---|"]
    for r in a["methods"]:
        gain = pm(r["gain vs best single"]) if "gain vs best single" in r else ""
        lines.append(f"| {r['method']} | {pm(r['val'])} | {pm(r['test'])} | {gain} | {'; '.join(r['picked'])} |")
    lines += ["", "## The claims (paired test-mAP differences; 95% t-interval over the pairs)", "",
              "| claim | difference | n | 95% interval | verdict |", "|---|---:|---:|---|---|"]
    for c in a["claims"]:
        d = c["difference"]
        lo, hi = d["ci95"]
        lines.append(f"| {c['claim']} | {pm(d)} | {d['n']} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def dry_run(args) -> str:
    """What the benchmark would run: per seed its sweep's name, trials and ensembles."""
    from mlic_dist.sweep.spec import ensemble_names, load_sweep

    lines = []
    for seed in args.seeds:
        spec = load_sweep(args.config, [f"seed={seed}", f"sweep.name=paper-s{seed}", *args.overrides])
        trials = spec.trials()
        t = trials[0].cfg.train
        lines.append(f"seed {seed}: sweep {spec.name}, {len(trials)} trials (at most {t.epochs} epochs, "
                     f"early stopping patience {t.early_stopping}), ensembles {', '.join(ensemble_names(spec.ensembles))}")
        lines += [f"  {tr.name}" for tr in trials]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/paper.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sweeps" / "paper-mini.yaml")
    p.add_argument("--dry-run", action="store_true", help="print each seed's trials and ensembles; run nothing")
    p.add_argument("--reuse", type=Path, nargs="*", default=[],
                   help="finished sweep directories of this grid (with --config configs/sweeps/demo.yaml: runs/sweeps/demo); their seed is not rerun")
    p.add_argument("--tables-only", action="store_true", help="read the seeds' sweeps, run nothing")
    p.add_argument("--out", type=Path, default=None, help="output stem (default: bench/results/paper-mini-cpu "
                   "for paper-mini.yaml, bench/results/paper-cpu for the demo's grid, CONFIG-STEM-cpu otherwise)")
    p.add_argument("overrides", nargs="*", help="sweep-file overrides for every seed (train.epochs=2 ...)")
    args = p.parse_args(argv)

    import time

    from mlic_dist.demo.run import prepare_data
    from mlic_dist.sweep.spec import load_sweep
    from trainer import machine_info

    if args.out is None:
        stem = "paper" if args.config.stem == "demo" else args.config.stem
        args.out = ROOT / "bench" / "results" / f"{stem}-cpu"
    if args.dry_run:
        print(dry_run(args))
        return 0
    t0 = time.time()
    sweeps = {}
    for d in args.reuse:
        s = read_sweep(d.resolve())
        sweeps[s["seed"]] = s
    shards = prepare_data("data/scenes", "data/shards/scenes", 800, 200, 200) if not args.tables_only else None
    for seed in args.seeds:
        if seed in sweeps:
            print(f"seed {seed}: reusing {sweeps[seed]['dir']}", flush=True)
            continue
        if args.tables_only:
            root = load_sweep(args.config, [f"seed={seed}", f"sweep.name=paper-s{seed}", *args.overrides]).root_dir
        else:
            root = run_seed(seed, args, shards)
        sweeps[seed] = read_sweep(root)
    ordered = [sweeps[s] for s in sorted(sweeps)]
    analysis = analyse(ordered)
    meta = {"benchmark": "paper_claims", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "wall_min": (time.time() - t0) / 60, "config": str(args.config),
            "overrides": args.overrides}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, **analysis, "sweeps": ordered}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = markdown(analysis, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"written: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
