"""Trainer overhead: `mlic_dist.train.train_one_epoch` against a plain PyTorch loop, same work.

    python bench/trainer.py                                  # CPU: resnet18, 112 px, batch 16
    python bench/trainer.py --out bench/results/trainer-cpu.json
    python bench/trainer.py --model resnet101 --size 448 --batch 64 --precision bf16   # one GPU
    python bench/trainer.py --profile                        # + cProfile of both loops

Both loops train the same model (same seed, channels_last, same SGD param groups with the
backbone/head learning rates of `build_optimizer`, same loss (`mlic_dist.losses`), same precision) on
one fixed batch already on the device, so the data pipeline is out of the picture:
  - trainer: the real inner loop, `train_one_epoch(run, epoch)`, with a real Accelerator from
    `build_accelerator`, a `Run` as train.py builds it (tracker disabled) and an in-memory
    loader that satisfies the Loader contract (len, set_epoch, iterating `Batch`es on device).
    One call = one epoch of `--steps` optimizer steps, progress bar, per-step logging, the
    end-of-epoch `acc.reduce` included, exactly what a real epoch pays.
  - plain: ~20 lines of PyTorch: autocast forward, loss, (scaled) backward, step, zero_grad.
The two alternate `--repeats` times (order flipped every repeat, against drift); each number is
the median. overhead % = plain steps/s / trainer steps/s - 1 (time the trainer adds per step).
The target (issue "trainer overhead <= 3%") is reported as `pass`.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mlic_dist.config import load_config  # noqa: E402
from mlic_dist.models import create_model  # noqa: E402

try:  # the data package defines the contract's Batch; any object with these attributes works
    from mlic_dist.data.batch import Batch  # noqa: E402
except ImportError:  # pragma: no cover - data package not written yet
    Batch = namedtuple("Batch", "images targets mask ids")

TARGET_OVERHEAD_PCT = 3.0


# --------------------------------------------------------------------------- machine


def write_result(result: dict, out) -> dict:
    """Print a bench result as JSON, and write it to `out` when given (what every bench records)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return result


def machine_info() -> dict:
    """CPU model/count, torch version and the GPU (if any): what every bench JSON records."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": None,
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        import accelerate
        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- fixtures


class InMemoryLoader:
    """A Loader (docs/contracts.md) that yields the same on-device Batch `n_batches` times."""

    def __init__(self, batch, n_batches: int):
        self.batch = batch
        self.n_batches = n_batches
        self.num_samples = n_batches * batch.images.shape[0]
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for _ in range(self.n_batches):
            yield self.batch


def fake_batch(batch_size: int, size: int, num_classes: int, device, seed: int = 0):
    """A random contract Batch on `device`: channels_last images, multi-hot targets, a mask
    with a few ignored entries, ids 0..B-1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g)  # (B, 3, S, S)
    targets = (torch.rand(batch_size, num_classes, generator=g) < 0.3).float()  # (B, C) multi-hot
    mask = (torch.rand(batch_size, num_classes, generator=g) > 0.05).float()  # (B, C)
    ids = torch.arange(batch_size, dtype=torch.int64)
    return Batch(images.to(device).contiguous(memory_format=torch.channels_last), targets.to(device),
                 mask.to(device), ids.to(device))


def bench_config(model: str, size: int, batch: int, precision: str, compile: bool = False,
                 output_dir: str | None = None, extra: list[str] | tuple = ()):
    """A real Config for the benchmark (pretrained off, tracking off, no checkpoints)."""
    out = output_dir or str(Path(tempfile.gettempdir()) / "mlic_bench_run")  # created only if used
    return load_config(None, [
        f"model.backbone={model}", "model.pretrained=none", f"model.compile={str(compile).lower()}",
        f"data.size={size}", f"data.batch_size_per_gpu={batch}", f"train.mixed_precision='{precision}'",
        "tracking.enabled=false", f"train.output_dir={out}", "train.resume=never", *extra])


def reset_accelerate_state() -> None:
    """Accelerate keeps its precision in a process-wide singleton; a benchmark that changes
    precision in one process must clear it first (the distributed state is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(False)
    GradientState._reset_state()


def make_trainer_run(cfg, loader, num_classes: int):
    """A `Run` built the way `mlic_dist.train.build_run` builds one, around `loader`."""
    from accelerate.utils import set_seed

    from mlic_dist.tracking.tracker import Tracker
    from mlic_dist.train.optim import build_optimizer
    from mlic_dist.train.loop import Run, TrainState, build_accelerator

    acc = build_accelerator(cfg)
    set_seed(cfg.seed)
    model = create_model(cfg.model.backbone, num_classes, cfg.model.pretrained, cfg.model.dropout)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out, active=acc.is_main_process)
    classes = [f"c{i}" for i in range(num_classes)]
    return Run(cfg=cfg, accelerator=acc, model=model, optimizer=optimizer, scheduler=None,
               train_loader=loader, val_loader=None, test_loader=None, classes=classes, out=out,
               tracker=tracker, state=TrainState())


def time_trainer_epoch(run, epoch: int) -> tuple[float, dict]:
    """Seconds for one `train_one_epoch` (all of the loader's batches), device synchronised."""
    from mlic_dist.train.loop import TrainState, train_one_epoch

    run.state = TrainState(epoch=epoch)  # train() resets step_in_epoch between epochs
    sync(run.accelerator.device)
    c0, t0 = time.process_time(), time.perf_counter()
    stats = train_one_epoch(run, epoch)
    sync(run.accelerator.device)
    stats["process_cpu_s"] = time.process_time() - c0
    return time.perf_counter() - t0, stats


class PlainLoop:
    """The reference: the same model, param groups, loss and precision in plain PyTorch."""

    def __init__(self, cfg, num_classes: int, device: torch.device, precision: str):
        from mlic_dist.losses import build_loss

        self.loss_fn = build_loss(cfg.loss)
        self.device = device
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.backbone, num_classes, cfg.model.pretrained, cfg.model.dropout)
        model = model.to(device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        backbone, head = model.param_groups()
        o = cfg.optim
        groups = [{"params": backbone, "lr": o.lr}, {"params": head, "lr": o.head_lr}]
        self.optimizer = (torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
                          if o.name == "sgd" else
                          torch.optim.Adam(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay))
        self.model = torch.compile(model) if cfg.model.compile else model
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def steps(self, batch, n: int) -> float:
        """Seconds for n optimizer steps on `batch`, device synchronised (CPU seconds of this
        process in `self.last_cpu_s`)."""
        model, opt, scaler = self.model, self.optimizer, self.scaler
        model.train()
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = model(batch.images)  # (B, C)
            loss = self.loss_fn(logits.float(), batch.targets, batch.mask)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
        sync(self.device)
        self.last_cpu_s = time.process_time() - c0
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- profiling


def _profile(fn) -> tuple[dict, str]:
    """{function: {calls, self_s, cum_s, callees: {callee: cum_s of that edge}}} and a text report."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    st = pstats.Stats(prof)

    def name(k):
        return f"{Path(k[0]).name}:{k[1]}({k[2]})"

    by_fn = {name(k): {"calls": v[1], "self_s": v[2], "cum_s": v[3], "callees": {}} for k, v in st.stats.items()}
    for callee, v in st.stats.items():
        for caller, edge in v[4].items():
            by_fn[name(caller)]["callees"][name(callee)] = edge[3]
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    return by_fn, buf.getvalue()


def profile_both(run, plain: PlainLoop, batch, steps: int, top: int = 20) -> dict:
    """cProfile one trainer epoch and the same number of plain steps. Every function that only
    the trainer calls is charged its cumulative time minus the time spent in callees that the
    plain loop also calls (the model, loss.backward, the optimizer's step): what it adds."""
    trainer_fns, trainer_txt = _profile(lambda: time_trainer_epoch(run, 10_000))
    plain_fns, _ = _profile(lambda: plain.steps(batch, steps))
    epoch_s = next(v["cum_s"] for k, v in trainer_fns.items() if k.endswith("(train_one_epoch)"))
    plain_s = max(v["cum_s"] for v in plain_fns.values())
    memo: dict = {}

    def added_s(key: str, visiting=frozenset()) -> float:
        """Own time plus the trainer-only share of its callees' time (shared callees: 0)."""
        if key in memo:
            return memo[key]
        v = trainer_fns[key]
        total = v["self_s"]
        for c, edge_s in v["callees"].items():
            if c in plain_fns or c in visiting or c == key:
                continue
            cum = trainer_fns[c]["cum_s"]
            total += edge_s * (added_s(c, visiting | {key}) / cum if cum > 0 else 0.0)
        memo[key] = total
        return total

    rows = []
    for key, v in trainer_fns.items():
        if key in plain_fns or "bench" in key or key.startswith("trainer.py"):
            continue
        added = added_s(key)
        if added < 1e-4:
            continue
        rows.append({"function": key, "calls": v["calls"], "added_s": round(added, 5),
                     "cum_s": round(v["cum_s"], 5), "added_ms_per_step": round(1e3 * added / steps, 4),
                     "added_pct_of_epoch": round(100 * added / epoch_s, 3)})
    rows.sort(key=lambda r: -r["added_s"])
    # Roots of the trainer-only call trees (called only from shared code or the benchmark): their
    # added times do not overlap, so their sum is all the time the trainer adds.
    own = {k for k in trainer_fns if k not in plain_fns and "bench" not in k and not k.startswith("trainer.py")}
    callers = {k: set() for k in trainer_fns}
    for k, v in trainer_fns.items():
        for c in v["callees"]:
            callers.setdefault(c, set()).add(k)
    roots = [k for k in own if not (callers.get(k, set()) & own)]
    total_added = sum(added_s(k) for k in roots)
    print(trainer_txt, file=sys.stderr)
    return {"note": "cProfile (adds its own per-call cost). added_s = a function's own time plus, "
                    "recursively, that of the callees the plain loop never calls (time inside the "
                    "model, loss.backward, SGD.step etc. is excluded); a caller's row includes its "
                    "trainer-only callees' rows",
            "steps": steps, "trainer_epoch_s": round(epoch_s, 4), "plain_steps_s": round(plain_s, 4),
            "trainer_only_total_added_s": round(total_added, 5),
            "trainer_only_roots": sorted(roots, key=lambda k: -added_s(k))[:10],
            "trainer_only_functions": rows[:top]}


# --------------------------------------------------------------------------- main


def run_benchmark(a) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = bench_config(a.model, a.size, a.batch, a.precision, compile=a.compile)
    num_classes = a.num_classes
    # The trainer first: build_accelerator also sets the CPU thread count both loops then share.
    run = make_trainer_run(cfg, None, num_classes)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = run.accelerator.device
    precision = run.accelerator.mixed_precision  # fp16 falls back to "no" on a CPU
    batch = fake_batch(a.batch, a.size, num_classes, device)
    plain = PlainLoop(cfg, num_classes, device, precision)

    run.train_loader = InMemoryLoader(batch, a.warmup)
    time_trainer_epoch(run, 0)
    plain.steps(batch, a.warmup)
    run.train_loader = InMemoryLoader(batch, a.steps)
    repeats = []
    for r in range(a.repeats):
        order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
        rec = {"order": list(order)}
        for which in order:
            if which == "trainer":
                rec["trainer_s"], stats = time_trainer_epoch(run, r + 1)
                rec["trainer_cpu_s"] = stats["process_cpu_s"]
                rec["trainer_loss"] = round(stats["train_loss"], 5)
            else:
                rec["plain_s"] = plain.steps(batch, a.steps)
                rec["plain_cpu_s"] = plain.last_cpu_s
        rec["trainer_steps_per_s"] = a.steps / rec["trainer_s"]
        rec["plain_steps_per_s"] = a.steps / rec["plain_s"]
        rec["overhead_pct"] = 100 * (rec["trainer_s"] / rec["plain_s"] - 1)
        rec["overhead_pct_cpu_time"] = 100 * (rec["trainer_cpu_s"] / rec["plain_cpu_s"] - 1)
        repeats.append(rec)
        print(f"repeat {r}: trainer {rec['trainer_steps_per_s']:.3f} steps/s, plain "
              f"{rec['plain_steps_per_s']:.3f} steps/s, overhead {rec['overhead_pct']:+.2f}%", file=sys.stderr)

    t_sps = statistics.median(r["trainer_steps_per_s"] for r in repeats)
    p_sps = statistics.median(r["plain_steps_per_s"] for r in repeats)
    overhead = 100 * (p_sps / t_sps - 1)
    result = {
        "benchmark": "trainer_overhead",
        "date": now_iso(),
        "machine": machine_info(),
        "settings": {"model": a.model, "size": a.size, "batch": a.batch, "steps": a.steps,
                     "warmup": a.warmup, "repeats": a.repeats, "precision": a.precision,
                     "precision_effective": precision, "compile": a.compile, "device": str(device),
                     "torch_threads": torch.get_num_threads(),
                     "num_classes": num_classes, "channels_last": cfg.model.channels_last,
                     "optimizer": cfg.optim.name, "log_every_steps": cfg.train.log_every_steps,
                     "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None},
        "trainer_steps_per_s": round(t_sps, 4),
        "plain_steps_per_s": round(p_sps, 4),
        "trainer_images_per_s": round(t_sps * a.batch, 2),
        "plain_images_per_s": round(p_sps * a.batch, 2),
        "overhead_pct": round(overhead, 3),
        "overhead_pct_paired_median": round(statistics.median(r["overhead_pct"] for r in repeats), 3),
        "overhead_pct_range": [round(min(r["overhead_pct"] for r in repeats), 3),
                               round(max(r["overhead_pct"] for r in repeats), 3)],
        # CPU seconds of this process instead of wall time: on a CPU shared with other jobs the
        # wall time swings with their load, the process's own CPU time much less (CPU device only;
        # on a GPU the host mostly waits and only wall time means anything).
        "overhead_pct_cpu_time_median": round(statistics.median(r["overhead_pct_cpu_time"] for r in repeats), 3),
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "pass": overhead <= TARGET_OVERHEAD_PCT,
        "repeats": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in repeats],
    }
    if a.profile:
        prof = profile_both(run, plain, batch, a.steps)
        # What the trainer's own Python adds per epoch, over the plain loop's measured time for the
        # same steps: far less noisy than the steps/s difference on a shared machine.
        result["profile_attributed_overhead_pct"] = round(
            100 * prof["trainer_only_total_added_s"] / (a.steps / p_sps), 4)
        result["profile"] = prof
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="a registry name (mlic_dist.models)")
    p.add_argument("--size", type=int, default=112, help="square input side in px")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per loop and repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for both loops (default: what build_accelerator sets, all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto = cuda if available")
    p.add_argument("--profile", action="store_true", help="also cProfile both loops (adds a 'profile' key)")
    p.add_argument("--out", help="also write the JSON here")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return write_result(run_benchmark(a), a.out)


if __name__ == "__main__":
    main()
