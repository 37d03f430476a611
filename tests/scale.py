"""Scale on one CPU machine: many GPUs as gloo processes, several nodes as several torchrun
agents on 127.0.0.1, a node that does not share a filesystem as a private mount namespace.
(Ray clusters with GPUs: tests/ray_cluster.py.) docs/testing.md says what each simulates and
what it cannot.

    p = torchrun(["-m", "mlic_dist.train", *overrides], nproc=4, cwd=tmp_path)    # 4 "GPUs"
    a, b = two_nodes(["-m", "mlic_dist.train", *overrides], port, cwd=tmp_path,
                     private=[tmp_path / "runs"])    # node 1 sees its own empty tmpfs there
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(**extra) -> dict:
    """The environment of a simulated rank: this checkout first, one OpenMP thread each (N ranks
    share 2 cores), no inherited torchrun variables."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**base, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", **extra}


def torchrun_cmd(args: Sequence[str], nproc: int, port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [str(BIN / "torchrun"), "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
            *map(str, args)]


def torchrun(args: Sequence[str], nproc: int, port: int, cwd, timeout: float = 300,
             extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`nproc` processes on one simulated node (gloo on CPU, as on N GPUs with NCCL)."""
    return subprocess.run(torchrun_cmd(args, nproc, port), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env(**(extra_env or {})))


def private_mounts_work() -> bool:
    """Can this process make a private mount namespace (root, and unshare(1) allowed here)?"""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def two_nodes(args: Sequence[str], port: int, cwd, nproc: int = 1, private: Sequence[Path] = (),
              timeout: float = 180) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Two simulated nodes of `nproc` ranks each, joined over 127.0.0.1. Node 1 runs in a private
    mount namespace where each path in `private` is an empty tmpfs: storage node 0 writes there
    never reaches it, as on a node that does not mount the shared filesystem. Both agents are
    waited for (and killed at `timeout`); returns (node 0, node 1)."""
    node1 = torchrun_cmd(args, nproc, port, nnodes=2, node_rank=1)
    if private:
        mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs tmpfs {p}" for p in private)
        node1 = ["unshare", "-m", "sh", "-c", f"mount --make-rprivate / && {mounts} && exec \"$@\"", "sh", *node1]
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                              start_new_session=True)
             for cmd in (torchrun_cmd(args, nproc, port, nnodes=2, node_rank=0), node1)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    return done[0], done[1]
