"""Atomic checkpoints that survive `kill -9`, loadable with `weights_only=True`.

A checkpoint is a directory `OUTPUT/checkpoints/e{epoch:04d}-s{step:07d}/` (epoch in progress,
optimizer steps done in it; `-s0000000` is an epoch boundary) holding
  state.pt        model, optimizer, scheduler, grad scaler, trainer state (rank 0 writes it)
  rng-{rank}.pt   each rank's Python / NumPy / torch RNG states, and its training loader's
                  state at the start of the epoch ("loader": DALI's checkpoint, see data/dali.py)
  meta.json       small facts readable without torch (e.g. the best epoch the state names)
  files.json      written last: every file above with its size and sha256
It is written under a temporary name and renamed when complete (a rename is atomic on POSIX),
so a directory with the final name is whole when written; a killed write leaves only a `.tmp-*`
directory, which the next save removes. A checkpoint damaged later (a truncated copy, a disk
error, a deleted file) fails `damage()`, which names the file: `latest_whole()` skips it for the
previous whole one, and resume says what is lost.

Everything is stored as tensors, numbers, strings, lists and dicts, so loading with
`weights_only=True` reads it: no pickled code runs when a checkpoint is loaded.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import publish_dir, replace_with, write_text

_NAME = re.compile(r"^e(\d{4})-s(\d{7})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


FILES = "files.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories (whole or not), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(x) for x in _NAME.match(p.name).groups()))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(path: str | Path) -> str | None:
    """Why checkpoint `path` cannot be resumed, naming the file; None when every file it was
    written with is there with its size and digest."""
    path = Path(path)
    if not path.is_dir():
        return "no such checkpoint directory"
    listing = path / FILES
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _legacy_damage(path)
    except (OSError, ValueError):
        return f"{FILES} cannot be read as JSON"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name} is {size} bytes but {want.get('bytes')} were written (truncated or overwritten)"
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match the digest it was written with (corrupt)"
    if "state.pt" not in files:
        return f"{FILES} lists no state.pt"
    return None


def _legacy_damage(path: Path) -> str | None:
    """A checkpoint written before files.json existed (earlier releases) is whole when its
    files load: state.pt, the RNG file of every rank it names, meta.json."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return "state.pt is missing"
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError ...
        return f"state.pt cannot be loaded ({type(e).__name__}: {str(e)[:120]})"
    for rank in range(int(state.get("world_size", 1))):
        try:
            torch.load(path / f"rng-{rank}.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return f"rng-{rank}.pt is missing"
        except Exception as e:  # noqa: BLE001
            return f"rng-{rank}.pt cannot be loaded ({type(e).__name__})"
    try:
        json.loads((path / "meta.json").read_text(encoding="utf-8")) if (path / "meta.json").exists() else None
    except (OSError, ValueError):
        return "meta.json cannot be read as JSON"
    return None


def latest_whole(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint, and the damaged ones newer than it (path, why), newest first."""
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        why = damage(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def latest(output_dir: str | Path) -> Path | None:
    return latest_whole(output_dir)[0]


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x):
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- save / load


def save(output_dir: str | Path, *, epoch: int, step: int, rank: int, world_size: int,
         payload: dict | None, barrier, keep: int = 2, protect: tuple[Path, ...] = (),
         meta: dict | None = None, rank_state: dict | None = None) -> Path:
    """Write a checkpoint atomically; every rank calls this (rank 0 passes `payload`).

    `barrier` synchronises the ranks (e.g. `accelerator.wait_for_everyone`), so the rename
    happens only once every rank's RNG file is on disk.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"e{epoch:04d}-s{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    _atomic_torch_save({**rng_state(), "loader": dict(rank_state or {})}, tmp / f"rng-{rank}.pt")
    if rank == 0:
        payload = dict(payload or {})
        payload["world_size"] = world_size
        payload["saved_at"] = time.time()
        _atomic_torch_save(payload, tmp / "state.pt")
        write_text(tmp / "meta.json", json.dumps(meta or {}))
    barrier()
    if rank == 0:   # last: a checkpoint is whole when every file matches this listing
        listing = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        write_text(tmp / FILES, json.dumps(listing, indent=1))
        publish_dir(tmp, final)   # replaces a re-run of the same step (resume after a crash)
        _prune(output_dir, keep, protect + (final,))
    barrier()
    return final


def load(path: str | Path, rank: int, map_location="cpu") -> tuple[dict, dict | None]:
    """(state payload, this rank's RNG state or None if the world size changed)."""
    path = Path(path)
    state_file = path / "state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.pt); "
                                f"pass train.resume=auto to pick the newest complete one")
    state = torch.load(state_file, map_location=map_location, weights_only=True)
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json ({} for checkpoints written before it existed)."""
    f = Path(path) / "meta.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def remove_after(output_dir: str | Path, keep_up_to: Path) -> list[Path]:
    """Delete the checkpoints newer than `keep_up_to` (a resume from an older one, or an epoch
    restart: the abandoned trajectory's checkpoints must not win the next `resume=auto`)."""
    order = tuple(int(x) for x in _NAME.match(Path(keep_up_to).name).groups())
    gone = [p for p in list_checkpoints(output_dir)
            if tuple(int(x) for x in _NAME.match(p.name).groups()) > order]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_weights(model_state: dict, path: str | Path) -> None:
    """A plain state dict (the best model), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(model_state, Path(path))


def _atomic_torch_save(obj, path: Path) -> None:
    with replace_with(path) as tmp:
        torch.save(obj, tmp)


def _prune(output_dir, keep: int, protect: tuple[Path, ...]) -> None:
    """Keep the `keep` newest, plus the newest epoch boundary (`-s0000000`): a resume that cannot
    continue mid-epoch exactly (another world size) restarts the epoch from there."""
    ckpts = list_checkpoints(output_dir)
    boundaries = [p for p in ckpts if p.name.endswith("-s0000000")]
    protected = {p.resolve() for p in protect if p} | {p.resolve() for p in boundaries[-1:]}
    for p in ckpts[:-keep] if keep > 0 else ckpts:
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
    for p in checkpoint_dir(output_dir).glob(".tmp-*"):
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
