"""bench/paper.py's statistics: the best single model and each ensemble are chosen on validation
per seed, claims are paired differences with a t-interval, and the verdicts follow the interval
(a gap inside the seeds' spread is called noise, not a win)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import paper  # noqa: E402  (bench/paper.py)


def sweep(seed: int, m1_128: float, noise: float) -> dict:
    """A seed's trials: mobilenet_v2 at 2 sizes x M1/M2; M2 always 5 points under M1 (test), 128
    px 3 points over 96 px; an M3 trial has the best *test* score but a poor *val* score."""
    trials = []
    for size in (96, 128):
        for aug in ("M1", "M2"):
            test = m1_128 - (0 if size == 128 else 0.03) - (0.05 if aug == "M2" else 0)
            trials.append({"name": f"s{size}-{aug}-{seed}", "backbone": "mobilenet_v2", "size": size,
                           "augment": aug, "val": test, "test": test})
    # the best test score with a poor validation score: never picked, selection is on validation
    trials.append({"name": f"s128-M3-{seed}", "backbone": "mobilenet_v2", "size": 128, "augment": "M3",
                   "val": 0.10, "test": 0.99})
    best = next(t for t in trials if (t["size"], t["augment"]) == (128, "M1"))
    ensembles = [
        # ScaleEn: a real gain of 2 points with small noise; DistrEn: +/- noise around 0
        {"name": f"scale-{seed}", "kind": "scale", "val": 0.5, "test": best["test"] + 0.02 + noise / 10},
        {"name": f"scale-weak-{seed}", "kind": "scale", "val": 0.4, "test": 0.99},   # lower val: not picked
        {"name": f"distr-{seed}", "kind": "distr", "val": 0.5, "test": best["test"] + noise},
    ]
    return {"dir": f"/s{seed}", "seed": seed, "trials": trials, "ensembles": ensembles}


def test_choices_are_made_on_validation_and_claims_follow_their_intervals():
    a = paper.analyse([sweep(0, 0.90, +0.01), sweep(1, 0.91, -0.012), sweep(2, 0.92, +0.002)])
    methods = {m["method"]: m for m in a["methods"]}
    assert methods["best single (val)"]["picked"] == ["s128-M1-0", "s128-M1-1", "s128-M1-2"]
    assert methods["ScaleEn"]["picked"] == ["scale-0", "scale-1", "scale-2"]
    claims = {c["claim"].split(" (")[0]: c for c in a["claims"]}
    scale = claims["ScaleEn beats the best single model"]
    assert scale["verdict"] == "holds" and scale["difference"]["mean"] == pytest.approx(0.02, abs=2e-3)
    assert claims["DistrEn beats the best single model"]["verdict"] == "inside the noise"
    m2 = claims["M2 beats M1"]
    assert m2["verdict"] == "contradicted" and m2["difference"]["mean"] == pytest.approx(-0.05)
    assert m2["difference"]["n"] == 6             # 2 sizes x 3 seeds
    size = claims["128 px beats 96 px"]
    assert size["difference"]["n"] == 6
    lo, hi = size["difference"]["ci95"]
    assert lo <= size["difference"]["mean"] <= hi and size["verdict"] == "holds"
    md = paper.markdown(a, {"machine": {"cpu_model": "x", "cpu_count": 2}, "date": "d", "wall_min": 1.0})
    assert "| ScaleEn beats the best single model" in md and "holds" in md and "contradicted" in md


def test_a_single_seed_gives_no_verdict():
    a = paper.analyse([sweep(0, 0.9, 0.0)])
    assert {c["verdict"] for c in a["claims"] if c["difference"]["n"] == 1} == {"one sample: no verdict"}


def test_the_miniature_has_the_papers_shape(capsys):
    """make bench-paper's plan (dry run: nothing trains): 3 seeds, sizes about 15% apart, every
    trial early-stopped on validation mAP, and exactly the paper's Table 3 ensembles per seed."""
    from mlic_dist.config import flatten, to_dict
    from mlic_dist.ensemble.selection import EnsembleRule, find_groups
    from mlic_dist.sweep.spec import load_sweep

    assert paper.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in out.splitlines() if ln.startswith("seed")] == ["seed 0", "seed 1", "seed 2"]
    assert "9 trials" in out and "early stopping patience 2" in out and "ScaleEn[" in out and "greedy" in out
    spec = load_sweep(ROOT / "configs" / "sweeps" / "paper-mini.yaml")
    trials = [flatten(to_dict(t.cfg)) for t in spec.trials()]
    sizes = sorted({t["data.size"] for t in trials})
    assert len(sizes) == 3 and all(1.10 <= b / a <= 1.20 for a, b in zip(sizes, sizes[1:]))
    assert all(t["train.early_stopping"] > 0 and t["train.epochs"] > t["train.early_stopping"] for t in trials)
    got = {}
    for rule in (e for e in spec.ensembles if isinstance(e, EnsembleRule)):
        (g,) = find_groups(trials, rule.kind, lambda r: r, lambda r: 0, str, rule=rule)
        got[rule.name] = sorted((r["data.size"], r["data.augment"]) for r in g.items)
    assert got == {"ScaleEn": [(s, "M3") for s in sizes], "DistrEn": [(sizes[-1], "M2"), (sizes[-1], "M3")]}
