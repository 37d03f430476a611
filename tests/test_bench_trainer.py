"""bench/trainer.py runs end to end (tiny model, 3 steps) and writes the JSON the issue asks for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_bench_smoke(tmp_path):
    out = tmp_path / "trainer.json"
    cmd = [sys.executable, str(ROOT / "bench" / "trainer.py"), "--model", "tiny_cnn", "--size", "32",
           "--batch", "4", "--steps", "3", "--warmup", "1", "--repeats", "2", "--profile",
           "--device", "cpu", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d == json.loads(r.stdout)
    for key in ("trainer_steps_per_s", "plain_steps_per_s", "overhead_pct", "machine", "date", "settings",
                "repeats", "pass", "profile", "profile_attributed_overhead_pct"):
        assert key in d, key
    assert d["trainer_steps_per_s"] > 0 and d["plain_steps_per_s"] > 0
    assert len(d["repeats"]) == 2 and d["repeats"][0]["order"] != d["repeats"][1]["order"]
    assert d["machine"]["cpu_count"] >= 1 and d["machine"]["torch"]
    assert d["settings"]["steps"] == 3 and d["settings"]["model"] == "tiny_cnn"
    names = [row["function"] for row in d["profile"]["trainer_only_functions"]]
    assert any("train_one_epoch" in n for n in names)
