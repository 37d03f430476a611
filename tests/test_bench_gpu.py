"""bench/gpu.py: every section runs in --smoke mode on the CPU and writes its JSON; helpers work."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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
def test_gpu_bench_all_smoke(tmp_path):
    reason = _loaders_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "all", "--smoke", "--out", str(out),
           "--cache", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for section, keys in EXPECTED.items():
        files = sorted(out.glob(f"{section}-cpu-*.json"))
        assert len(files) == 1, (section, sorted(p.name for p in out.iterdir()))
        d = json.loads(files[0].read_text())
        for key in ("section", "device", "date", "versions", "machine", "settings", "results", "elapsed_s"):
            assert key in d, (section, key)
        assert d["section"] == section and d["device"] == "cpu" and d["smoke"] is True
        assert d["versions"]["torch"] and "dali" in d["versions"]
        for key in keys:
            assert key in d["results"], (section, key)
    decode = json.loads(next(out.glob("decode-*.json")).read_text())["results"]
    assert decode["dali"]["images_per_s"] > 0 and decode["torch"]["images_per_s"] > 0
    e2e = json.loads(next(out.glob("e2e-*.json")).read_text())["results"]
    assert e2e["runs"]["dali"]["ratio"] > 0 and e2e["runs"]["dali"]["e2e_images_per_s"] > 0
    correct = json.loads(next(out.glob("correct-*.json")).read_text())
    assert correct["results"]["training"]["cpu_fp32"]["val_mAP"] is not None
    assert correct["results"]["decode_mixed_vs_cpu"]["same_ids"] is True
    assert correct["pass"] is True
