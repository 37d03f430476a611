"""bench/gpu.py: every section runs in --smoke mode on the CPU and writes its JSON; helpers work."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# results keys each section must write (the lead reads these off the GPU runs)
EXPECTED = {
    "decode": ["dali", "torch"],
    "ceiling": ["per_batch", "batch_max_fit", "ceiling_images_per_s", "plain_loop_images_per_s",
                "trainer_overhead_pct"],
    "e2e": ["batch", "batch_from", "runs", "targets"],
    "calib": ["bf16"],
    "correct": ["training", "amp_minus_cpu_fp32_mAP", "decode_mixed_vs_cpu", "map_tol"],
}


def _load_gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _loaders_missing() -> str | None:
    try:
        from mlic_dist.data import build_loader  # noqa: F401
        import mlic_dist.train.loop  # noqa: F401
    except ImportError as e:
        return f"mlic_dist.data / mlic_dist.train not importable yet ({e})"
    for mod in ("nvidia.dali", "webdataset", "skimage"):
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            return f"{mod} is not installed"
    return None


def test_result_file_name_and_image_comparison(tmp_path):
    gpu = _load_gpu_module()
    path = gpu.write_result(tmp_path, {"section": "decode", "device": "NVIDIA H100 80GB HBM3",
                                       "date": "2026-11-23T10:00:00+00:00"})
    assert path.name == "decode-nvidia-h100-80gb-hbm3-2026-11-23.json"
    cfg = SimpleNamespace(normalize="imagenet")
    ids = np.array([2, 0, 1])
    images = np.random.default_rng(0).normal(size=(3, 3, 4, 4)).astype(np.float32)
    same = gpu.compare_images(cfg, (ids, images), (ids[::-1].copy(), images[::-1].copy()))
    assert same["same_ids"] and same["mean_abs_diff_01"] == 0.0 and same["images_compared"] == 3
    shifted = gpu.compare_images(cfg, (ids, images), (ids, images + 1.0))  # +1 std in every pixel
    assert shifted["max_abs_diff_01"] == pytest.approx(0.229, abs=1e-3)


def test_smoke_plan_is_small():
    gpu = _load_gpu_module()
    a = gpu.build_parser().parse_args(["all", "--smoke", "--cache", "/tmp/x"])
    plan = gpu.Plan.make(a)
    assert plan.device == "cpu" and plan.model == "resnet18" and plan.size == 64
    full = gpu.Plan.make(gpu.build_parser().parse_args(["ceiling"]))
    assert full.batch_candidates == [64, 96, 128, 192, 256] and full.precision == "bf16"


@pytest.mark.slow
def test_gpu_bench_sections_smoke(tmp_path):
    """ceiling, calib and correct in --smoke (decode, e2e and quick run in the device script's
    dry run below, which calls them the way a device call does)."""
    reason = _loaders_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "ceiling,calib,correct", "--smoke", "--out", str(out),
           "--cache", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for section in ("ceiling", "calib", "correct"):
        files = sorted(out.glob(f"{section}-cpu-*.json"))
        assert len(files) == 1, (section, sorted(p.name for p in out.iterdir()))
        d = json.loads(files[0].read_text())
        for key in ("section", "device", "date", "versions", "machine", "settings", "results", "elapsed_s"):
            assert key in d, (section, key)
        assert d["section"] == section and d["device"] == "cpu" and d["smoke"] is True
        assert d["versions"]["torch"] and "dali" in d["versions"]
        for key in EXPECTED[section]:
            assert key in d["results"], (section, key)
    correct = json.loads(next(out.glob("correct-*.json")).read_text())
    assert correct["results"]["training"]["cpu_fp32"]["val_mAP"] is not None
    assert correct["results"]["decode_mixed_vs_cpu"]["same_ids"] is True
    assert correct["pass"] is True


def test_an_unknown_section_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "ceiling,nosuch", "--smoke",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown section(s) ['nosuch']" in r.stderr and "Traceback" not in r.stderr


def _load_device_module():
    spec = importlib.util.spec_from_file_location("bench_gpu_device", ROOT / "bench" / "gpu_device.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_section_past_its_box_is_killed_with_its_children(tmp_path):
    dev = _load_device_module()
    pid_file = tmp_path / "child.pid"
    with open(tmp_path / "log", "w") as log:
        status, took = dev.run_box("slow", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 2.0, log)
    assert status == {"exit": None, "timed_out": True} and took < 10
    child = int(pid_file.read_text())
    for _ in range(50):                      # killed with its process group: gone, or a zombie
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the section's child {child} outlived its box")


@pytest.mark.slow
def test_device_script_dry_run_writes_one_json_of_every_section(tmp_path):
    """bash bench/gpu_device.sh --dry-run: the one-call plan on the CPU with tiny sizes, through
    the same script, boxes and JSON a device call uses (no GPU number comes from it)."""
    reason = _loaders_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "MLIC_BENCH_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_device.sh"), "--dry-run", "--budget-s", "540"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = out.glob("gpu-device-cpu-*.json")
    d = json.loads(path.read_text())
    assert d["device"] == "cpu" and d["dry_run"] is True and d["pass"] is None
    assert d["versions"]["torch"] and d["versions"]["dali"] and d["versions"]["webdataset"]
    assert [p["section"] for p in d["plan"]] == ["quick", "decode", "e2e"]
    assert sum(p["box_s"] for p in d["plan"]) == pytest.approx(540, abs=1)
    log = (out / "gpu-device.log").read_text()
    for name, s in d["sections"].items():
        assert s["exit"] == 0 and not s["timed_out"] and s["wall_s"] <= s["box_s"], (name, s, log[-3000:])
    quick = d["sections"]["quick"]["results"]
    for key in ("train_torch", "train_dali", "resume", "decode_mixed_vs_cpu", "extras_RA", "extras_CO"):
        assert quick[key]["ok"] is True, (key, quick[key])
    resume = quick["resume"]
    assert resume["resumed"].startswith("resumed from") and "(epoch 1," in resume["resumed"]
    assert resume["dali_state_in_checkpoint"] is True       # DALI's reader state went into the checkpoint
    assert resume["epoch2_rel_diff"] < 1e-6                 # and replayed epoch 2 as a run without a stop
    assert quick["extras_CO"]["fill_fraction"] > 10 * quick["extras_CO"]["fill_fraction_M2"]
    assert d["complete"] is True
    assert d["sections"]["quick"]["pass"] is True
    decode = d["sections"]["decode"]["results"]
    assert decode["dali"]["images_per_s"] > 0 and decode["torch"]["images_per_s"] > 0
    e2e = d["sections"]["e2e"]["results"]
    assert set(e2e["runs"]) == {"dali"} and 0 < e2e["runs"]["dali"]["ratio"]
    assert e2e["runs"]["dali"]["ceiling_images_per_s"] > 0
