"""The processes of a run: the Accelerator they train with (`build_accelerator`: precision, DDP
settings, threads per process), and what DDP ranks need to agree on: the plain module under the
wrappers, and proof that every rank holds the same weights. The other functions take an
Accelerate `Accelerator` (or any object with its `unwrap_model`, `num_processes`)."""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..resources import cores_per_process


def unwrap(accelerator, model) -> torch.nn.Module:
    """The plain module under DDP and torch.compile, whatever their order: checkpoints have the
    same keys for 1 or N processes, compiled or not. (Accelerate looks for a compiled model only
    above DDP; `compile` then `prepare` puts it below, so `_orig_mod` is stripped here too.)"""
    return compiled_original(accelerator.unwrap_model(model, keep_torch_compile=False))


def compiled_original(m: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's wrappers: OptimizedModule's private `_orig_mod`, checked
    against torch 2.11-2.14 (tests/test_private_apis.py)."""
    while hasattr(m, "_orig_mod"):
        m = m._orig_mod
    return m


def param_digest(model) -> str:
    """A checksum of the parameters (DDP ranks must agree bit for bit)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gather(accelerator, obj) -> list:
    """`obj` from every rank, in rank order (a one-element list in a single process)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def check_shared_dir(accelerator, out: Path) -> None:
    """Every rank sees the same `out` (train.output_dir): rank 0 writes a token there, every rank
    reads it back. Checkpoints need it (rank 0 makes a checkpoint's directory, every rank writes
    its RNG file into it): on a node that does not share the directory the first checkpoint would
    fail there and hang the other ranks at the next barrier. Raises the same one-line UserError on
    every rank, naming the ranks and nodes that do not see it (no rank is left at a barrier)."""
    err = None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = e.strerror or str(e)
    if accelerator.num_processes == 1:
        if err:
            raise UserError(f"train.output_dir={str(out)!r} cannot be created ({err}); choose a writable directory")
        return
    from accelerate.utils import broadcast_object_list

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = out / f".shared-{token[0]}"
    if accelerator.is_main_process and err is None:
        try:
            probe.write_text(token[0])
        except OSError as e:
            err = e.strerror or str(e)
    accelerator.wait_for_everyone()
    try:
        sees = probe.read_text() == token[0]
    except OSError:
        sees = False
    node = node_rank() or "?"
    rows = gather(accelerator, (accelerator.process_index, node, socket.gethostname(), sees, err))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [r for r in rows if not r[3]]
    if blind:
        where = "; ".join(f"rank {r} on node {n} ({h})" + (f": {e}" if e else "") for r, n, h, _, e in blind)
        raise UserError(f"train.output_dir={str(out)!r} is not shared by every process: {where} do(es) not see "
                        f"what rank 0 wrote there. Checkpoints need one directory all ranks read and write: put "
                        f"train.output_dir on storage every node mounts at the same path (NFS, a parallel "
                        f"filesystem), or run on one node")


def node_rank() -> str | None:
    """This process's node as its launcher numbers it: torchrun's GROUP_RANK, Ray Train's
    NODE_RANK, accelerate launch's MACHINE_RANK; None when no launcher says."""
    return os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK") or os.environ.get("MACHINE_RANK")


def several_nodes(accelerator) -> bool:
    """Does the run span more than this node: fewer processes here (LOCAL_WORLD_SIZE, set by
    torchrun and Ray Train) than in the run? The same answer on every rank, also where nodes hold
    different numbers of processes (Ray placing 3 workers as 2 + 1)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return accelerator.num_processes > local


def check_ranks_in_sync(accelerator, model) -> str:
    """The parameters' digest; raises if the ranks' parameters diverged (a DDP bug shows here first)."""
    digests = gather(accelerator, param_digest(unwrap(accelerator, model)))
    if len(set(digests)) != 1:
        raise RuntimeError(f"parameters differ across ranks after training: {digests}")
    return digests[0]


def reset_accelerate_state() -> None:
    """Forget the previous run's Accelerator settings: the AcceleratorState / GradientState
    singletons outlive a train() call (tests, reused Ray workers), and a new Accelerator would
    keep the old precision. The process group (PartialState) is kept. Accelerate's private
    `_reset_state`, checked against accelerate 1.15 (tests/test_private_apis.py)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def build_accelerator(cfg):
    """The Accelerator of a run (`cfg`: a `config.Config`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = cfg.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("train.mixed_precision=fp16 needs a GPU; running in fp32 on this CPU")
        precision = "no"
    ddp = DistributedDataParallelKwargs(
        bucket_cap_mb=cfg.train.ddp_bucket_cap_mb,
        gradient_as_bucket_view=cfg.train.ddp_gradient_as_bucket_view,
        static_graph=cfg.train.ddp_static_graph,
    )
    # cpu=True on a machine without CUDA: Accelerate then runs torchrun/accelerate-launched
    # processes as MULTI_CPU over gloo (without it every process trains alone).
    reset_accelerate_state()
    acc = Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False,
                      cpu=not torch.cuda.is_available())
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: autotuned kernels pay off
    if acc.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several processes on one host share its cores; oversubscription halves throughput.
        # An explicit OMP_NUM_THREADS (a shared machine, a Ray worker's share) is respected.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        torch.set_num_threads(cores_per_process(local))
    return acc
