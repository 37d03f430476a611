"""The GPU path proven in one call (issue 22): bench/gpu.py's sections, each in its own time box,
collected into one JSON.

    bash bench/gpu_device.sh                 # on the device machine (installs the carried wheels)
    python bench/gpu_device.py --out DIR     # the same without the wheel step
    python bench/gpu_device.py --dry-run --out DIR   # the plan and the JSON layout on a CPU, tiny sizes

The plan, in this order (correctness before speed; a box that runs out is recorded as
`timed_out` and the next section starts):

    quick    resnet18 128 px bf16: a few steps with the torch loader, then with DALI `mixed`; the
             DALI run resumed from its checkpoint; mixed vs CPU decoding on the same images;
             RandAugment / Cutout in the DALI graph for two batches
    decode   DALI `mixed` vs the torch loader, images/s, 448 px M2 (bench photos, sharded first)
    e2e      ResNet-101 448 px bf16 through the trainer with DALI vs the synthetic-input ceiling
             of the same Run in the same process, at --batch (default 96: room for DALI's
             buffers beside the model on an 80 GB card)

Each section runs as `python bench/gpu.py SECTION` in a subprocess killed at its box (a hung
CUDA call or a slow section cannot eat the next one); what it wrote goes into
OUT/gpu-device-{device}-{date}.json with the device name, torch / CUDA / DALI versions, the plan
(boxes, settings) and every section's record. The boxes add up to --budget-s (default 470 s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = (("quick", 0.38), ("decode", 0.20), ("e2e", 0.42))   # section, share of the budget
E2E_BATCH = 96


def versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for mod, name in (("nvidia.dali", "dali"), ("webdataset", "webdataset"), ("accelerate", "accelerate"),
                      ("torchvision", "torchvision")):
        try:
            out[name] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a crash
            out[name] = None
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def device_name(dry_run: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry_run else "cpu"


def section_cmd(name: str, a, work: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), name, "--out", str(work), "--cache", a.cache]
    if a.dry_run:
        cmd.append("--smoke")
    else:                          # one set of shards, built by the first section, used by all
        cmd += ["--photos", str(a.photos)]
    if name == "decode":
        cmd += ["--seconds", str(a.seconds)] if not a.dry_run else []
    if name == "e2e":
        cmd += ["--e2e-loaders", "dali"]
        if not a.dry_run:
            cmd += ["--batch", str(a.batch), "--seconds", str(a.seconds)]
    return cmd


def run_box(name: str, cmd: list[str], box_s: float, log) -> tuple[dict, float]:
    """Run one section in its box; its JSON record, or what stopped it."""
    t0 = time.perf_counter()
    print(f"== {name} (box {box_s:.0f} s): {' '.join(cmd)}", file=log, flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)                   # the section and anything it started
        except ProcessLookupError:                   # it ended at that very moment
            pass
        proc.wait()
        rc = None
    return {"exit": rc, "timed_out": rc is None}, time.perf_counter() - t0


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")),
                   help="folder for gpu-device-*.json and gpu-device.log (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the plan and the JSON layout")
    p.add_argument("--budget-s", type=float, default=470.0, help="all sections together (default 470 s)")
    p.add_argument("--started-at", type=float, default=0.0,
                   help="when the call began (epoch s; gpu_device.sh passes it): the sections end by "
                        "--call-limit-s after it, whatever the wheel install took")
    p.add_argument("--call-limit-s", type=float, default=560.0,
                   help="the device command's own limit, less a margin (default 560 of 600 s)")
    p.add_argument("--batch", type=int, default=E2E_BATCH, help=f"e2e batch (default {E2E_BATCH})")
    p.add_argument("--seconds", type=float, default=25.0, help="decode / e2e measuring time per loader")
    p.add_argument("--photos", type=int, default=2048, help="bench photos to shard (default 2048)")
    p.add_argument("--cache", default=os.environ.get("MLIC_BENCH_CACHE", "/tmp/mlic_bench"))
    p.add_argument("--sections", default=",".join(n for n, _ in PLAN), help="a subset, in plan order")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.cache) / "device-results"
    work.mkdir(parents=True, exist_ok=True)
    wanted = [x.strip() for x in a.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - {n for n, _ in PLAN})
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {[n for n, _ in PLAN]}")
    plan = [(n, share) for n, share in PLAN if n in wanted]
    if a.started_at:
        a.budget_s = max(30.0, min(a.budget_s, a.call_limit_s - (time.time() - a.started_at)))
    total = sum(share for _, share in plan)
    dev = device_name(a.dry_run)
    record = {"device": dev, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": a.dry_run,
              "versions": versions(), "budget_s": a.budget_s,
              "plan": [{"section": n, "box_s": round(a.budget_s * share / total, 1),
                        "cmd": " ".join(section_cmd(n, a, work))} for n, share in plan],
              "sections": {}}
    t_all = time.perf_counter()
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    path = out / f"gpu-device-{slug}-{time.strftime('%Y-%m-%d')}.json"
    with open(out / "gpu-device.log", "a") as log:
        left = a.budget_s
        for k, (name, share) in enumerate(plan):
            box = max(10.0, left * share / sum(s for _, s in plan[k:]))   # time a section left unused goes on
            for f in work.glob(f"{name}-*.json"):
                f.unlink()
            status, took = run_box(name, section_cmd(name, a, work), box, log)
            left -= took
            found = sorted(work.glob(f"{name}-*.json"))
            body = json.loads(found[-1].read_text()) if found else {}
            for k2 in ("device", "date", "versions", "smoke"):       # said once, at the top
                body.pop(k2, None)
            record["sections"][name] = {**status, "box_s": round(box, 1), "wall_s": round(took, 1), **body}
            print(f"== {name}: exit {status['exit']}, {took:.0f} s, pass {body.get('pass')}", file=log, flush=True)
            write(record, path, t_all, a.dry_run, done=k == len(plan) - 1)   # kept if the call is cut off
    print(json.dumps({name: {k: s.get(k) for k in ("exit", "timed_out", "wall_s", "pass")}
                      for name, s in record["sections"].items()}, indent=1))
    print(f"wrote {path}")
    return path


def write(record: dict, path: Path, t0: float, dry_run: bool, done: bool) -> None:
    """The record so far, atomically: `complete` false until the last section has run."""
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["complete"] = done
    # no claim from a CPU: a dry run tests the plan and the layout, not the targets
    record["pass"] = None if dry_run or not done else all(
        s.get("exit") == 0 and s.get("pass") is not False for s in record["sections"].values())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
