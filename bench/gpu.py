"""GPU benchmarks and checks (issue 6), one section per command so each fits a 10-minute call.

    python bench/gpu.py decode  --out bench/results   # DALI mixed decode vs the torch loader, 448 px M2
    python bench/gpu.py ceiling --out bench/results   # ResNet-101 448 bf16: batch search, synthetic img/s
    python bench/gpu.py e2e     --out bench/results   # the same through train_one_epoch with DALI
    python bench/gpu.py calib   --out bench/results   # ResNet-50 224 AMP vs NVIDIA's 2,470 img/s (A100)
    python bench/gpu.py correct --out bench/results   # AMP vs CPU fp32 mAP; mixed vs cpu decoding
    python bench/gpu.py all     --out bench/results   # all five (longer than one 10-minute call)
    python bench/gpu.py all --smoke --out /tmp/r      # every section on the CPU, tiny sizes (CI)
    python bench/gpu.py quick   --out bench/results   # bench/gpu_device.sh's correctness checks
    add --compile to ceiling / e2e for the torch.compile variants

Each section prints its JSON and writes OUT/{section}-{device}-{YYYY-MM-DD}.json with `device`
(torch.cuda.get_device_name, or "cpu"), `date`, `versions` (torch, torchvision, DALI,
accelerate), `machine`, `settings`, `results` and, where the issue sets a target, `pass`.
Images come from bench/photos.py (distinct 500x375 real-photo JPEGs), sharded with
`python -m mlic_dist.shard csv` into --cache (default /tmp/mlic_bench, reused while the machine
lives). bench/gpu_device.md gives the exact sequence for a lent H100/H200.

What each section measures:
  decode   images/s out of `build_loader(loader=dali)` (GPU `mixed` decode + resize + flip,
           M2 random-resized-crop at 448 px, batch 64) and `loader=torch` (DataLoader with one
           worker per core), whole epochs, device synchronised; steady state excludes each
           epoch's time to first batch (pipeline build / worker start), reported separately.
  ceiling  ResNet-101 448 px bf16 channels_last on one synthetic batch already on the GPU,
           through the real `train_one_epoch` (in-memory loader): batch 64/96/128/192/256 until
           one runs out of memory; the largest that fits is the ceiling; a plain PyTorch loop at
           that batch shows the trainer's own overhead; --compile adds the compiled model.
  e2e      `build_run` + `train_one_epoch` with the DALI loader on the bench shards (what a
           user runs), then the same Run with the in-memory loader at the same batch count per
           epoch (the ceiling, same process, same model): ratio target >= 0.97, >= 600 img/s
           on one H100. Also the torch loader end to end, for comparison.
  calib    ResNet-50 224 px, batch 256, bf16 and fp16 (and TF32 "no"), synthetic: compare with
           NVIDIA DeepLearningExamples' 2,470 img/s (AMP) / 938 img/s (TF32) on one A100 80GB.
  correct  (1) the same short training (resnet18, 128 px, M0 so no random augmentation, from
           scratch, the demo scenes) as a CPU fp32 reference in a subprocess that sees no GPU,
           and on the GPU in fp32 (the hardware-noise baseline) and bf16: |mAP(bf16) - mAP(CPU)|
           <= --map-tol; (2) the validation split through the eval preset with DALI `mixed`
           (GPU) and `cpu` decoding: same ids, mean |diff| < 2/255 in 0-1 pixel units, max
           reported; DALI vs the torch loader is reported beside it, for information.
  quick    the one-call checks (bench/gpu_device.sh, issue 22): resnet18 128 px bf16, a few steps
           with the torch loader then DALI, the DALI run resumed from its checkpoint for a
           second epoch, mixed vs CPU decoding, RandAugment / Cutout in the DALI graph (2 batches).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import trainer as tb  # noqa: E402  (bench/trainer.py)

SECTIONS = ("decode", "ceiling", "e2e", "calib", "correct")   # `all`
ONE_CALL = ("quick",)           # bench/gpu_device.py's own: not in `all`
NVIDIA_RN50_A100_AMP = 2470.0   # img/s, DeepLearningExamples RN50 v1.5, 1x A100 80GB, AMP, DALI
NVIDIA_RN50_A100_TF32 = 938.0
E2E_RATIO_TARGET = 0.97
E2E_IMAGES_PER_S_TARGET = 600.0  # one H100, ResNet-101 448 px
DECODE_TOL_01 = 2.0 / 255.0
QUICK_RESUME_REL_TOL = 1e-2      # quick: |loss(resumed epoch 2) - loss(straight)| / loss


# --------------------------------------------------------------------------- settings


@dataclass
class Plan:
    """Every size the sections use; `full` for a GPU, `smoke` for a 2-core CPU in < 60 s."""
    smoke: bool
    device: str
    cache: str
    workers: int
    photos: int = 4096
    val_fraction: float = 0.2
    num_classes: int = 20
    decode_size: int = 448
    decode_batch: int = 64
    decode_seconds: float = 20.0
    decode_max_epochs: int = 50
    model: str = "resnet101"
    size: int = 448
    precision: str = "bf16"
    batch_candidates: list = field(default_factory=lambda: [64, 96, 128, 192, 256])
    batch: int = 0                      # 0 = from the ceiling result / search
    steps: int = 20
    warmup: int = 5
    e2e_seconds: float = 45.0
    e2e_max_epochs: int = 20
    e2e_loaders: list = field(default_factory=lambda: ["dali", "torch"])
    compile: bool = False
    calib_model: str = "resnet50"
    calib_size: int = 224
    calib_batch: int = 256
    calib_precisions: list = field(default_factory=lambda: ["bf16", "fp16", "no"])
    calib_steps: int = 30
    correct_model: str = "resnet18"
    correct_size: int = 128
    correct_batch: int = 32
    correct_epochs: int = 6
    correct_lr: float = 0.05
    scenes: tuple = (600, 150, 0)       # train, val, test
    parity_batches: int = 8
    map_tol: float = 0.05
    cudnn_benchmark: bool = True

    @classmethod
    def make(cls, a) -> "Plan":
        gpu = torch.cuda.is_available() and not a.smoke
        workers = a.workers or (os.cpu_count() or 1)
        p = cls(smoke=a.smoke, device="cuda" if gpu else "cpu", cache=a.cache, workers=workers)
        if a.smoke:
            p = cls(smoke=True, device="cpu", cache=a.cache, workers=min(workers, 2), photos=40,
                    val_fraction=0.25, decode_size=64, decode_batch=8, decode_seconds=0.0,
                    decode_max_epochs=1, model="resnet18", size=64, batch_candidates=[4, 8], steps=2,
                    warmup=1, e2e_seconds=0.0, e2e_max_epochs=1, e2e_loaders=["dali"],
                    calib_model="resnet18", calib_size=64, calib_batch=8,
                    calib_precisions=["bf16"], calib_steps=2, correct_size=64, correct_batch=8,
                    correct_epochs=1, scenes=(24, 16, 0), parity_batches=2, map_tol=1.0)
        for k in ("photos", "batch", "steps", "compile", "map_tol"):
            v = getattr(a, k, None)
            if v:
                setattr(p, k, v)
        if a.seconds:
            p.decode_seconds = p.e2e_seconds = a.seconds
        p.cudnn_benchmark = not a.no_cudnn_benchmark
        if getattr(a, "e2e_loaders", ""):
            p.e2e_loaders = [x.strip() for x in a.e2e_loaders.split(",") if x.strip()]
        return p


def dali_version() -> str | None:
    try:
        import nvidia.dali as dali
        return dali.__version__
    except Exception:  # noqa: BLE001 - absent or broken install: sections fall back
        return None


def device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu"


def header(section: str, plan: Plan) -> dict:
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "dali": dali_version(),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if plan.device == "cuda" else None}
    for mod in ("accelerate", "webdataset"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {"section": section, "device": device_name(plan), "date": tb.now_iso(), "smoke": plan.smoke,
            "versions": versions, "machine": tb.machine_info(), "settings": asdict(plan)}


def write_result(out_dir: Path, record: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]).strip("-").lower() or "unknown"
    path = Path(out_dir) / f"{record['section']}-{slug}-{record['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    path.write_text(text + "\n")
    print(text, flush=True)
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return path


def free_memory(*objs) -> None:
    for o in objs:
        acc = getattr(o, "accelerator", None)
        if acc is not None:
            acc.free_memory()
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() \
        or "CUDNN_STATUS_ALLOC_FAILED" in str(e)


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def sub_env(hide_gpu: bool = False) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# --------------------------------------------------------------------------- data


def _photos_part(args):
    from photos import make_photo_jpegs  # bench/photos.py

    out_dir, n, seed = args
    return [str(p) for p in make_photo_jpegs(out_dir, n, size=(500, 375), seed=seed)]


def run_shard(csv_path: Path, images: Path, out: Path, workers: int) -> None:
    cmd = [sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images", str(images),
           "--out", str(out), "--workers", str(workers), "--shard-size", "64", "--no-progress", "--overwrite"]
    r = subprocess.run(cmd, cwd=ROOT, env=sub_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def bench_shards(plan: Plan) -> Path:
    """Shards of `plan.photos` distinct 500x375 photo JPEGs (train/val), built once per cache."""
    root = Path(plan.cache) / f"photos-{plan.photos}"
    shards = root / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    import multiprocessing as mp

    t0 = time.perf_counter()
    parts = max(1, min(plan.workers, plan.photos // 32 or 1))
    jobs = [(root / "photos" / f"p{k:02d}", plan.photos * (k + 1) // parts - plan.photos * k // parts, k)
            for k in range(parts)]
    if parts > 1:
        with mp.get_context("fork").Pool(parts) as pool:
            paths = [p for chunk in pool.map(_photos_part, jobs) for p in chunk]
    else:
        paths = _photos_part(jobs[0])
    rng = np.random.default_rng(0)
    classes = [f"class{i:02d}" for i in range(plan.num_classes)]
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "split"])
        for p in paths:
            names = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)
            split = "val" if rng.random() < plan.val_fraction else "train"
            w.writerow([str(Path(p).relative_to(root)), "|".join(sorted(names)), split])
    run_shard(csv_path, root, shards, plan.workers)
    print(f"bench shards: {len(paths)} photos in {time.perf_counter() - t0:.1f} s -> {shards}",
          file=sys.stderr, flush=True)
    return shards


def scene_shards(plan: Plan) -> Path:
    """The demo scenes (real photos with pasted objects: learnable labels), sharded once."""
    n_train, n_val, n_test = plan.scenes
    root = Path(plan.cache) / f"scenes-{n_train}-{n_val}-{n_test}"
    shards = root / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    from mlic_dist.demo.scenes import build_scenes

    csv_path = build_scenes(root, n_train, n_val, n_test, seed=0)
    run_shard(csv_path, root, shards, plan.workers)
    return shards


class TimedLoader:
    """Wraps a Loader: records each epoch's time to first batch and the images it yields."""

    def __init__(self, loader):
        self.loader = loader
        self.first_batch_s: list[float] = []
        self.images = 0

    def __len__(self):
        return len(self.loader)

    @property
    def num_samples(self):
        return self.loader.num_samples

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        t0 = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_s.append(time.perf_counter() - t0)
            self.images += int(batch.images.shape[0])
            yield batch


def loader_config(plan: Plan, shards: Path, loader: str, size: int, batch: int, augment: str,
                  model: str | None = None, compile: bool = False, precision: str | None = None):
    return tb.bench_config(model or plan.model, size, batch, precision or plan.precision, compile=compile,
                           output_dir=str(Path(plan.cache) / "runs" / f"{loader}-{model or plan.model}"),
                           extra=[f"data.shards={shards}", f"data.loader={loader}", f"data.augment={augment}",
                                  f"data.num_workers={plan.workers}",
                                  f"data.eval_batch_size_per_gpu={batch}", "train.eval_test=false"])


# --------------------------------------------------------------------------- decode


def section_decode(plan: Plan) -> dict:
    from mlic_dist.data import build_loader

    shards = bench_shards(plan)
    device = torch.device(plan.device)
    results = {}
    for kind in ("dali", "torch"):
        if kind == "dali" and dali_version() is None:
            results[kind] = {"skipped": "nvidia.dali is not importable"}
            continue
        try:
            cfg = loader_config(plan, shards, kind, plan.decode_size, plan.decode_batch, "M2")
            t0 = time.perf_counter()
            loader = TimedLoader(build_loader(cfg.data, "train", train=True, rank=0, world_size=1,
                                              device=device, seed=0))
            build_s = time.perf_counter() - t0
            epochs, epoch_s = 0, []
            t_start = time.perf_counter()
            while epochs < plan.decode_max_epochs:
                loader.set_epoch(epochs)
                te = time.perf_counter()
                for batch in loader:
                    pass
                tb.sync(device)
                epoch_s.append(time.perf_counter() - te)
                epochs += 1
                if time.perf_counter() - t_start >= plan.decode_seconds:
                    break
            total = sum(epoch_s)
            steady = total - sum(loader.first_batch_s)  # without each epoch's first batch
            results[kind] = {
                "decoder": ("mixed" if device.type == "cuda" else "cpu") if kind == "dali" else "torchvision (CPU workers)",
                "workers_or_threads": plan.workers, "batch": plan.decode_batch, "batches_per_epoch": len(loader),
                "epochs": epochs, "images": loader.images, "build_s": round(build_s, 3),
                "images_per_s": round(loader.images / total, 1),
                "steady_images_per_s": (round((loader.images - epochs * plan.decode_batch) / steady, 1)
                                        if steady > 0 and len(loader) > 1 else None),
                "first_batch_s_median": round(statistics.median(loader.first_batch_s), 3),
                "epoch_s": [round(x, 3) for x in epoch_s],
            }
            del loader
        except Exception as e:  # noqa: BLE001 - one loader failing must not lose the other's number
            traceback.print_exc()
            results[kind] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
    d, t = results.get("dali", {}), results.get("torch", {})
    if "images_per_s" in d and "images_per_s" in t:
        results["dali_over_torch"] = round(d["images_per_s"] / t["images_per_s"], 2)
    return {"results": results, "data": {"shards": str(shards), "photos": plan.photos, "source_size": [500, 375],
                                         "size": plan.decode_size, "augment": "M2"}}


# --------------------------------------------------------------------------- ceiling


def trainer_images_per_s(plan: Plan, model: str, size: int, batch: int, precision: str, steps: int,
                         warmup: int, compile: bool = False) -> dict:
    """The real train_one_epoch on one synthetic on-device batch; frees everything after."""
    cfg = tb.bench_config(model, size, batch, precision, compile=compile,
                          output_dir=str(Path(plan.cache) / "runs" / "synthetic"))
    run = None
    try:
        tb.reset_accelerate_state()  # the previous Run is freed; precision may differ
        run = tb.make_trainer_run(cfg, None, plan.num_classes)
        fake = tb.fake_batch(batch, size, plan.num_classes, run.accelerator.device)
        run.train_loader = tb.InMemoryLoader(fake, warmup)
        warm_s, _ = tb.time_trainer_epoch(run, 0)
        run.train_loader = tb.InMemoryLoader(fake, steps)
        t, stats = tb.time_trainer_epoch(run, 1)
        return {"batch": batch, "images_per_s": round(steps * batch / t, 1), "step_ms": round(1e3 * t / steps, 2),
                "warmup_s": round(warm_s, 2), "peak_gib": peak_gib(), "loss": round(stats["train_loss"], 4),
                "precision_effective": run.accelerator.mixed_precision}
    finally:
        free_memory(run)
        if compile:
            torch._dynamo.reset()


def plain_images_per_s(plan: Plan, model: str, size: int, batch: int, precision: str, steps: int,
                       warmup: int, compile: bool = False) -> dict:
    cfg = tb.bench_config(model, size, batch, precision, compile=compile)
    device = torch.device(plan.device)
    eff = precision if (device.type == "cuda" or precision != "fp16") else "no"
    loop = tb.PlainLoop(cfg, plan.num_classes, device, eff)
    try:
        fake = tb.fake_batch(batch, size, plan.num_classes, device)
        loop.steps(fake, warmup)
        t = loop.steps(fake, steps)
        return {"batch": batch, "images_per_s": round(steps * batch / t, 1), "step_ms": round(1e3 * t / steps, 2),
                "peak_gib": peak_gib()}
    finally:
        del loop
        free_memory()
        if compile:
            torch._dynamo.reset()


def batch_search(plan: Plan) -> tuple[list, int | None]:
    rows, fits = [], None
    for b in plan.batch_candidates:
        oom = False
        try:
            r = trainer_images_per_s(plan, plan.model, plan.size, b, plan.precision, plan.steps, plan.warmup)
            rows.append(r)
            fits = b
            print(f"batch {b}: {r['images_per_s']} img/s, peak {r['peak_gib']} GiB", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            oom = True
        free_memory()  # outside the except block: the traceback no longer pins the tensors
        if oom:
            rows.append({"batch": b, "oom": True})
            print(f"batch {b}: out of memory", file=sys.stderr, flush=True)
            break
    return rows, fits


def section_ceiling(plan: Plan) -> dict:
    rows, fits = batch_search(plan)
    if fits is None:
        return {"results": {"per_batch": rows, "error": "no batch size fits"}}
    best = max((r for r in rows if "images_per_s" in r), key=lambda r: r["images_per_s"])
    at_fit = next(r for r in rows if r.get("batch") == fits)
    plain = plain_images_per_s(plan, plan.model, plan.size, fits, plan.precision, plan.steps, plan.warmup)
    res = {"per_batch": rows, "batch_max_fit": fits, "batch_best": best["batch"],
           "ceiling_images_per_s": at_fit["images_per_s"], "best_images_per_s": best["images_per_s"],
           "plain_loop_images_per_s": plain["images_per_s"],
           "trainer_overhead_pct": round(100 * (plain["images_per_s"] / at_fit["images_per_s"] - 1), 2)}
    if plan.compile:
        for what, fn in (("trainer", trainer_images_per_s), ("plain_loop", plain_images_per_s)):
            try:
                r = fn(plan, plan.model, plan.size, fits, plan.precision, plan.steps, plan.warmup, compile=True)
                res[f"compiled_{what}"] = r
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res[f"compiled_{what}"] = {"error": f"{type(e).__name__}: {e}"}
        c = res["compiled_trainer"].get("images_per_s")
        res["compile_speedup"] = round(c / at_fit["images_per_s"], 3) if c else None
    return {"results": res}


# --------------------------------------------------------------------------- e2e


def e2e_batch(plan: Plan, out_dir: Path) -> tuple[int, str]:
    if plan.batch:
        return plan.batch, "--batch"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(plan)).strip("-").lower()
    for f in sorted(Path(out_dir).glob(f"ceiling-{slug}-*.json"), reverse=True):
        r = json.loads(f.read_text())
        if r.get("settings", {}).get("model") == plan.model and r["results"].get("batch_max_fit"):
            return int(r["results"]["batch_max_fit"]), str(f)
    _, fits = batch_search(plan)
    if fits is None:
        raise RuntimeError("no batch size fits on this device")
    return fits, "search"


def e2e_one(plan: Plan, shards: Path, loader: str, batch: int, compile: bool) -> dict:
    from mlic_dist.train.loop import build_run

    cfg = loader_config(plan, shards, loader, plan.size, batch, "M2", compile=compile)
    run = None
    try:
        tb.reset_accelerate_state()
        run = build_run(cfg)
        real = TimedLoader(run.train_loader)
        run.train_loader = real
        warm_s, _ = tb.time_trainer_epoch(run, 0)      # pipeline, cudnn autotune, compile
        real.first_batch_s.clear()
        real.images = 0
        epoch_s, epoch = [], 1
        while epoch <= plan.e2e_max_epochs:
            t, _ = tb.time_trainer_epoch(run, epoch)
            epoch_s.append(t)
            epoch += 1
            if sum(epoch_s) >= plan.e2e_seconds:
                break
        n_batches = len(real)
        e2e = real.images / sum(epoch_s)
        steady = (real.images - len(epoch_s) * batch) / (sum(epoch_s) - sum(real.first_batch_s)) \
            if n_batches > 1 else None
        # The ceiling: same Run (model, optimizer, accelerator), same batches per epoch, synthetic data.
        fake = tb.fake_batch(batch, plan.size, len(run.classes), run.accelerator.device)
        run.train_loader = tb.InMemoryLoader(fake, n_batches)
        ceil_s = [tb.time_trainer_epoch(run, epoch + k)[0] for k in range(max(1, min(3, len(epoch_s))))]
        ceiling = n_batches * batch / statistics.median(ceil_s)
        ratio = e2e / ceiling
        return {"loader": loader, "compile": compile, "batch": batch, "batches_per_epoch": n_batches,
                "epochs_timed": len(epoch_s), "images": real.images, "warmup_epoch_s": round(warm_s, 2),
                "epoch_s": [round(x, 3) for x in epoch_s],
                "first_batch_s_median": round(statistics.median(real.first_batch_s), 3) if real.first_batch_s else None,
                "e2e_images_per_s": round(e2e, 1),
                "e2e_steady_images_per_s": round(steady, 1) if steady else None,
                "ceiling_images_per_s": round(ceiling, 1), "ratio": round(ratio, 4),
                "peak_gib": peak_gib(),
                "pass_ratio": ratio >= E2E_RATIO_TARGET,
                "pass_images_per_s": e2e >= E2E_IMAGES_PER_S_TARGET}
    finally:
        free_memory(run)
        if compile:
            torch._dynamo.reset()


def section_e2e(plan: Plan, out_dir: Path) -> dict:
    shards = bench_shards(plan)
    batch, source = e2e_batch(plan, out_dir)
    runs = {}
    loaders = [x for x in plan.e2e_loaders if x != "dali" or dali_version() is not None]
    variants = [(ld, False) for ld in loaders] + ([(loaders[0], True)] if plan.compile and loaders else [])
    for loader, comp in variants:
        key = loader + ("_compiled" if comp else "")
        try:
            runs[key] = e2e_one(plan, shards, loader, batch, comp)
            print(f"e2e {key}: {runs[key]['e2e_images_per_s']} img/s, ceiling {runs[key]['ceiling_images_per_s']}, "
                  f"ratio {runs[key]['ratio']}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            runs[key] = {"error": f"{type(e).__name__}: {e}"}
    main = runs.get("dali") if dali_version() is not None else None
    out = {"results": {"batch": batch, "batch_from": source, "runs": runs,
                       "targets": {"ratio": E2E_RATIO_TARGET, "images_per_s_one_h100": E2E_IMAGES_PER_S_TARGET}},
           "data": {"shards": str(shards), "photos": plan.photos, "augment": "M2", "size": plan.size}}
    if main and "ratio" in main:
        out["pass"] = bool(main["pass_ratio"] and (plan.smoke or main["pass_images_per_s"]))
    elif dali_version() is None:
        out["results"]["note"] = "nvidia.dali is not importable: no DALI end-to-end number"
    return out


# --------------------------------------------------------------------------- calibration


def section_calib(plan: Plan) -> dict:
    rows = {}
    for prec in plan.calib_precisions:
        tb.reset_accelerate_state()
        row = {}
        for what, fn in (("trainer", trainer_images_per_s), ("plain_loop", plain_images_per_s)):
            try:
                row[what] = fn(plan, plan.calib_model, plan.calib_size, plan.calib_batch, prec,
                               plan.calib_steps, plan.warmup)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row[what] = {"error": f"{type(e).__name__}: {e}"}
        ref = NVIDIA_RN50_A100_TF32 if prec == "no" else NVIDIA_RN50_A100_AMP
        ips = row["trainer"].get("images_per_s")
        row["nvidia_a100_80gb_reference"] = ref
        row["ratio_to_reference"] = round(ips / ref, 3) if ips else None
        rows[prec] = row
    tb.reset_accelerate_state()
    return {"results": rows,
            "reference": "NVIDIA DeepLearningExamples PyTorch ResNet-50 v1.5, 1x A100 80GB, AMP 2,470 img/s, "
                         "TF32 938 img/s (batch 256, DALI, 224 px); 'no' here = fp32 with PyTorch's default "
                         "TF32 convolutions. Theirs is real data end to end; ours is synthetic on-device input."}


# --------------------------------------------------------------------------- correctness


def small_training(plan: Plan, shards: Path, loader: str, augment: str, epochs: int, precision: str,
                   resume: str, out: Path) -> list[str]:
    """The overrides of the short from-scratch training `correct` and `quick` run."""
    return [f"data.shards={shards}", f"data.loader={loader}", f"data.augment={augment}",
            f"data.size={plan.correct_size}", f"data.batch_size_per_gpu={plan.correct_batch}",
            f"data.num_workers={plan.workers}", f"model.backbone={plan.correct_model}",
            "model.pretrained=none", f"optim.lr={plan.correct_lr}", f"optim.head_lr={plan.correct_lr}",
            "schedule.name=none", f"train.epochs={epochs}", f"train.mixed_precision='{precision}'",
            "train.eval_test=false", f"train.resume={resume}", "train.keep_checkpoints=1",
            f"train.output_dir={out}", "tracking.enabled=false", "seed=0"]


def train_variant(plan: Plan, shards: Path, name: str, precision: str, hide_gpu: bool, loader: str) -> dict:
    out = Path(plan.cache) / "runs" / f"correct-{name}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = small_training(plan, shards, loader, "M0", plan.correct_epochs, precision, "never", out)
    cmd = [sys.executable, "-m", "mlic_dist.train", *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=sub_env(hide_gpu=hide_gpu), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}", "stderr_tail": r.stderr[-3000:], "cmd": " ".join(cmd)}
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    return {"precision": precision, "device": "cpu" if hide_gpu or plan.device == "cpu" else "cuda",
            "val_mAP": metrics["val"]["mAP"], "best_epoch": metrics.get("best_epoch"),
            "val_mAP_per_epoch": [round(h["val_mAP"], 4) for h in history],
            "train_loss_per_epoch": [round(h["train_loss"], 4) for h in history], "wall_s": round(wall, 1)}


def collect_eval(data_cfg, device, max_batches: int) -> tuple[np.ndarray, np.ndarray]:
    from mlic_dist.data import build_loader

    loader = build_loader(data_cfg, "val", train=False, rank=0, world_size=1, device=device, seed=0)
    ids, images = [], []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        keep = batch.ids >= 0
        ids.append(batch.ids[keep].cpu().numpy())
        images.append(batch.images[keep].float().cpu().contiguous().numpy())
    del loader
    return np.concatenate(ids), np.concatenate(images)


def compare_images(data_cfg, a, b) -> dict:
    """Mean / max |a - b| in 0-1 pixel units (normalised values times std) over matching ids."""
    from mlic_dist.config.choices import MEAN_STD

    ids_a, im_a = a
    ids_b, im_b = b
    same_ids = bool(len(ids_a) == len(ids_b) and (np.sort(ids_a) == np.sort(ids_b)).all())
    common, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
    std01 = np.asarray(MEAN_STD[data_cfg.normalize][1], np.float32).reshape(1, 3, 1, 1) / 255.0
    diff = np.abs(im_a[ia] - im_b[ib]) * std01
    per_image = diff.reshape(len(common), -1).mean(1)
    return {"same_ids": same_ids, "images_compared": int(len(common)),
            "mean_abs_diff_01": float(diff.mean()), "max_abs_diff_01": float(diff.max()),
            "p99_abs_diff_01": float(np.quantile(diff, 0.99)),
            "worst_image_mean_abs_diff_01": float(per_image.max()),
            "mean_abs_diff_255": round(float(diff.mean()) * 255, 3)}


def section_correct(plan: Plan) -> dict:
    have_dali = dali_version() is not None
    loader = "dali" if have_dali else "torch"
    shards = None
    if not plan.smoke:  # smoke reuses the bench shards: one subprocess less on a 2-core CI box
        try:
            shards, data_from = scene_shards(plan), "mlic_dist.demo.scenes.build_scenes"
        except ImportError:  # no scikit-image
            pass
    if shards is None:
        shards, data_from = bench_shards(plan), "bench/photos.py (random labels)"
    res: dict = {"data": data_from, "shards": str(shards), "loader": loader}
    # (1) the same short training: CPU fp32 reference, then the accelerator (fp32 baseline and AMP).
    variants = [("cpu_fp32", "no", True)]
    variants += [("gpu_fp32", "no", False), ("gpu_bf16", "bf16", False)] if plan.device == "cuda" \
        else [("cpu_bf16", "bf16", True)]
    runs = {name: train_variant(plan, shards, name, prec, hide, loader) for name, prec, hide in variants}
    res["training"] = runs
    ref = runs["cpu_fp32"].get("val_mAP")
    amp_name = "gpu_bf16" if plan.device == "cuda" else "cpu_bf16"
    amp = runs[amp_name].get("val_mAP")
    ok_train = None
    if ref is not None and amp is not None:
        res["amp_minus_cpu_fp32_mAP"] = round(amp - ref, 4)
        if "gpu_fp32" in runs and runs["gpu_fp32"].get("val_mAP") is not None:
            res["gpu_fp32_minus_cpu_fp32_mAP"] = round(runs["gpu_fp32"]["val_mAP"] - ref, 4)
        ok_train = abs(amp - ref) <= plan.map_tol
    res["map_tol"] = plan.map_tol
    # (2) decoding parity on the eval preset.
    ok_decode = None
    if have_dali:
        cfg = loader_config(plan, shards, "dali", plan.correct_size if plan.smoke else plan.decode_size,
                            plan.decode_batch, "M0")
        try:
            gpu_dev = torch.device(plan.device)
            mixed = collect_eval(cfg.data, gpu_dev, plan.parity_batches)
            cpu = collect_eval(cfg.data, torch.device("cpu"), plan.parity_batches)
            cmp = compare_images(cfg.data, mixed, cpu)
            cmp["decoders"] = ["mixed" if gpu_dev.type == "cuda" else "cpu", "cpu"]
            cmp["size"] = cfg.data.size
            cmp["tolerance_mean_01"] = DECODE_TOL_01
            ok_decode = cmp["same_ids"] and cmp["mean_abs_diff_01"] < DECODE_TOL_01
            res["decode_mixed_vs_cpu"] = cmp
            try:
                tcfg = loader_config(plan, shards, "torch", cfg.data.size, plan.decode_batch, "M0")
                torch_cpu = collect_eval(tcfg.data, torch.device("cpu"), plan.parity_batches)
                res["decode_dali_cpu_vs_torch_info"] = compare_images(cfg.data, cpu, torch_cpu)
            except Exception as e:  # noqa: BLE001
                res["decode_dali_cpu_vs_torch_info"] = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["decode_mixed_vs_cpu"] = {"error": f"{type(e).__name__}: {e}"}
            ok_decode = False
    else:
        res["decode_mixed_vs_cpu"] = {"skipped": "nvidia.dali is not importable"}
    checks = [x for x in (ok_train, ok_decode) if x is not None]
    return {"results": res, "pass_training": ok_train, "pass_decode": ok_decode,
            "pass": bool(checks) and all(checks) and None not in (ok_train,)}


# --------------------------------------------------------------------------- quick (the one call)


def quick_train(plan: Plan, shards: Path, loader: str, name: str, epochs: int) -> dict:
    """`python -m mlic_dist.train` in bf16 on this device for `epochs` whole epochs of the bench
    photos into cache/runs/quick-NAME, resuming what is there."""
    out = Path(plan.cache) / "runs" / f"quick-{name}"
    overrides = small_training(plan, shards, loader, "M2", epochs, "bf16", "auto", out)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mlic_dist.train", *overrides], cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True)
    res: dict = {"loader": loader, "epochs": epochs, "exit": r.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0:
        res["stderr_tail"] = r.stderr[-3000:]
        return res
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    res["train_loss_per_epoch"] = [h["train_loss"] for h in history]
    res["val_mAP"] = json.loads((out / "metrics.json").read_text())["val"]["mAP"]
    res["resumed"] = next((ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("resumed from")), None)
    res["ok"] = len(history) == epochs and all(np.isfinite(h["train_loss"]) for h in history)
    return res


def loader_state_in_checkpoint(run_dir: Path) -> dict:
    """The loader state (`rng-0.pt` "loader") of the run's newest checkpoint."""
    newest = sorted((run_dir / "checkpoints").glob("e*"))[-1]
    state = torch.load(newest / "rng-0.pt", map_location="cpu", weights_only=True).get("loader") or {}
    return state.get("train", state) if isinstance(state, dict) else {}


def quick_resume(plan: Plan, shards: Path, loader: str) -> dict:
    """Epoch 2 on top of epoch 1's checkpoint (the DALI reader's own state in it) against the
    same two epochs without a stop: the resumed epoch's loss is the uninterrupted one's, within
    1 % on a GPU (bf16 GPU runs are not bit-reproducible; on the CPU the two are equal)."""
    ckpt = loader_state_in_checkpoint(Path(plan.cache) / "runs" / f"quick-{loader}")
    r = quick_train(plan, shards, loader, loader, 2)
    shutil.rmtree(Path(plan.cache) / "runs" / f"quick-{loader}-straight", ignore_errors=True)
    straight = quick_train(plan, shards, loader, f"{loader}-straight", 2)
    r["checkpoint_loader_state"] = sorted(ckpt)
    r["dali_state_in_checkpoint"] = bool(ckpt.get("dali")) if loader == "dali" else None
    if r.get("ok") and straight.get("ok"):
        a, b = r["train_loss_per_epoch"][1], straight["train_loss_per_epoch"][1]
        r["epoch2_loss_resumed_vs_straight"] = [a, b]
        r["epoch2_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
    r["ok"] = bool(r.get("ok") and r.get("resumed") and "(epoch 1," in r["resumed"]
                   and r["dali_state_in_checkpoint"] is not False
                   and r.get("epoch2_rel_diff", 1.0) <= QUICK_RESUME_REL_TOL)
    return r


def extras_batches(plan: Plan, shards: Path, preset: str) -> dict:
    """Two training batches of RandAugment / Cutout from the DALI loader on this device (on a
    GPU they are DALI operators in the graph), beside M2. Cutout is seen directly: pixels at its
    fill value (the normalisation mean) in every channel, ~8 % of a CO batch, ~0 of M2's.
    RandAugment's effect is not isolated (its random streams differ from M2's): only that its
    graph runs on the device and gives finite images."""
    from mlic_dist.config.choices import MEAN_STD
    from mlic_dist.data import build_loader
    from mlic_dist.data.augment import fill_value

    images = {}
    for name in (preset, "M2"):
        cfg = loader_config(plan, shards, "dali", plan.correct_size, plan.correct_batch, name)
        loader = build_loader(cfg.data, "train", train=True, rank=0, world_size=1,
                              device=torch.device(plan.device), seed=0)
        got = []
        for i, batch in enumerate(loader):
            got.append(batch.images.float())
            if i == 1:
                break
        loader.close()
        images[name] = got
        normalize = cfg.data.normalize
    mean, std = MEAN_STD[normalize]
    at_fill = torch.tensor([(f - m) / s for f, m, s in zip(fill_value(normalize), mean, std)])

    def fill_fraction(batches):
        hits = [((x - at_fill.to(x.device).view(1, 3, 1, 1)).abs() < 1e-2).all(dim=1).float().mean() for x in batches]
        return round(float(sum(hits) / len(hits)), 5)

    a = images[preset]
    out = dict(batches=len(a), device=str(a[0].device), shape=list(a[0].shape),
               finite=bool(all(torch.isfinite(x).all() for x in a)),
               mean_abs_diff_vs_M2=round(float(sum((x - y).abs().mean() for x, y in zip(a, images["M2"])) / len(a)), 4))
    out["ok"] = out["batches"] == 2 and out["finite"] and out["device"].startswith(plan.device)
    if preset == "CO":
        out["fill_fraction"], out["fill_fraction_M2"] = fill_fraction(a), fill_fraction(images["M2"])
        out["ok"] = out["ok"] and out["fill_fraction"] > 0.01 and out["fill_fraction"] > 10 * out["fill_fraction_M2"]
    return out


def section_quick(plan: Plan) -> dict:
    """Correctness first, in minutes (issue 22): a few bf16 steps with the torch loader, then
    with DALI; a checkpoint written and resumed (DALI's state in it); mixed vs CPU decoding on
    the same images; RandAugment / Cutout in the DALI graph for two batches."""
    have_dali = dali_version() is not None
    shards = bench_shards(plan)
    res: dict = {"shards": str(shards), "model": plan.correct_model, "size": plan.correct_size,
                 "batch": plan.correct_batch}
    oks = []

    def check(key, fn):
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            traceback.print_exc()
            res[key] = {"error": f"{type(e).__name__}: {e}", "ok": False}
        oks.append(bool(res[key].get("ok")))

    for loader in ("torch", "dali") if have_dali else ("torch",):
        shutil.rmtree(Path(plan.cache) / "runs" / f"quick-{loader}", ignore_errors=True)
        check(f"train_{loader}", lambda loader=loader: quick_train(plan, shards, loader, loader, 1))
    last = "dali" if have_dali else "torch"

    check("resume", lambda: quick_resume(plan, shards, last))
    if plan.device == "cuda" and not have_dali:
        res["dali"] = {"error": "nvidia.dali is not importable on a GPU machine: the DALI checks did not run"}
        oks.append(False)
    if have_dali:
        def parity():
            cfg = loader_config(plan, shards, "dali", plan.correct_size, plan.decode_batch, "M0")
            mixed = collect_eval(cfg.data, torch.device(plan.device), plan.parity_batches)
            cpu = collect_eval(cfg.data, torch.device("cpu"), plan.parity_batches)
            cmp = compare_images(cfg.data, mixed, cpu)
            cmp.update(decoders=["mixed" if plan.device == "cuda" else "cpu", "cpu"], tolerance_mean_01=DECODE_TOL_01)
            cmp["ok"] = bool(cmp["same_ids"] and cmp["mean_abs_diff_01"] < DECODE_TOL_01)
            return cmp
        check("decode_mixed_vs_cpu", parity)
        for preset in ("RA", "CO"):
            check(f"extras_{preset}", lambda preset=preset: extras_batches(plan, shards, preset))
    else:
        res["dali"] = {"skipped": "nvidia.dali is not importable"}
    return {"results": res, "pass": bool(oks) and all(oks)}


# --------------------------------------------------------------------------- main


def run_section(name: str, plan: Plan, out_dir: Path) -> Path:
    t0 = time.perf_counter()
    record = header(name, plan)
    fn = {"decode": section_decode, "ceiling": section_ceiling, "calib": section_calib,
          "correct": section_correct, "quick": section_quick}.get(name)
    body = section_e2e(plan, out_dir) if name == "e2e" else fn(plan)
    record.update(body)
    record["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return write_result(out_dir, record)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", default="all",
                   help=f"all, or one or more (comma list) of {', '.join((*SECTIONS, *ONE_CALL))}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON files")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: tests the script (< 60 s on 2 cores)")
    p.add_argument("--cache", default=os.environ.get("MLIC_BENCH_CACHE", "/tmp/mlic_bench"),
                   help="photos, shards and run folders (reused when present)")
    p.add_argument("--photos", type=int, default=0, help="bench photos to shard (default 4096)")
    p.add_argument("--workers", type=int, default=0, help="loader workers/threads (default: all cores)")
    p.add_argument("--batch", type=int, default=0, help="e2e batch (default: the ceiling result's, else a search)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per synthetic measurement (default 20)")
    p.add_argument("--seconds", type=float, default=0, help="decode / e2e measuring time per loader")
    p.add_argument("--compile", action="store_true", help="ceiling / e2e: also the torch.compile variants")
    p.add_argument("--e2e-loaders", default="", help="e2e: comma list of loaders (default dali,torch)")
    p.add_argument("--map-tol", type=float, default=0, help="correct: allowed |mAP(AMP) - mAP(CPU fp32)| (0.05)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off in the sections timed outside the trainer "
                        "(the trainer always sets it on CUDA)")
    return p


def main(argv=None) -> list[Path]:
    a = build_parser().parse_args(argv)
    plan = Plan.make(a)
    if plan.device == "cpu" and not plan.smoke:
        print("bench/gpu.py: no CUDA GPU here; the full sizes (ResNet-101 at 448 px) would take hours on a "
              "CPU. Run it on a GPU (bench/gpu_device.md) or test the script with --smoke.", file=sys.stderr)
        sys.exit(2)
    if plan.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"   # smoke on a GPU box stays on the CPU
    else:
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    Path(plan.cache).mkdir(parents=True, exist_ok=True)
    sections = SECTIONS if a.section == "all" else tuple(x.strip() for x in a.section.split(",") if x.strip())
    unknown = [x for x in sections if x not in (*SECTIONS, *ONE_CALL)]
    if unknown or not sections:
        print(f"bench/gpu.py: unknown section(s) {unknown or [a.section]}; choose all or from "
              f"{', '.join((*SECTIONS, *ONE_CALL))}", file=sys.stderr)
        sys.exit(2)
    written, failed = [], []
    for name in sections:
        try:
            written.append(run_section(name, plan, Path(a.out)))
        except Exception:  # noqa: BLE001 - in `all`, one broken section must not stop the rest
            traceback.print_exc()
            failed.append(name)
            if len(sections) == 1:
                raise
    if failed:
        print(f"sections that failed: {failed}", file=sys.stderr)
        sys.exit(1)
    return written


if __name__ == "__main__":
    main()
