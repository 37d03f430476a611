"""bench/sota.py runs end to end (tiny model, tiny scenes, 1 epoch, 2 variants) and writes the
JSON the issue asks for: machine, date, code commit and every run's val / test mAP."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sota_bench_smoke(tmp_path):
    out = tmp_path / "sota.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sota.py"), "--work", str(tmp_path / "work"), "--n-train", "24",
           "--n-val", "8", "--n-test", "8", "--epochs", "1", "--only", "asl+ema,CO", "--out", str(out),
           "model.backbone=tiny_cnn", "model.pretrained=none", "data.size=32", "data.batch_size_per_gpu=8",
           "optim.lr_scaling=none"]   # a tiny batch keeps the recipe's rates
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["benchmark"] == "sota" and d["machine"]["cpu_count"] >= 1 and d["date"] and d["code"]["commit"]
    assert [r["variant"] for r in d["runs"]] == ["asl+ema", "CO"]
    ema, co = d["runs"]
    assert ema["overrides"] == {"loss.name": "asl", "train.ema_decay": 0.98} and co["overrides"] == {"data.augment": "CO"}
    assert len(ema["val_mAP_ema_by_epoch"]) == 1 and ema["best_source"] in ("raw", "ema")
    assert all(0 <= r["val_mAP"] <= 1 and 0 <= r["test_mAP"] <= 1 for r in d["runs"])
    assert set(d["summary"]) == {"asl+ema", "CO"}
