"""mlic_dist.train.ema and the trainer's weight EMA: the average itself (parameters and BatchNorm
buffers), updates on applied optimizer steps only, selection of the better of raw and EMA
weights (history, metrics.json, best_model.pt). DDP agreement and kill-and-resume are in
test_train.py (the 2-process and SIGKILL tests run with EMA on)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlic_dist.config import load_config
from mlic_dist.train.ema import build_ema
from shard_fixtures import build_small_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=32, n_val=10, n_test=8,
                              num_classes=4, samples_per_shard=9)


def overrides(shards, out, **extra):
    base = {"data.shards": shards, "data.size": 32, "data.loader": "torch", "data.batch_size_per_gpu": 8,
            "data.num_workers": 1, "model.backbone": "tiny_cnn", "model.pretrained": "none",
            "train.epochs": 2, "train.mixed_precision": "no", "train.output_dir": out,
            "tracking.enabled": False, "train.ema_decay": 0.5}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_ema_is_the_exponential_average_of_weights_and_buffers():
    assert build_ema(torch.nn.Linear(2, 2), 0.0, "cpu") is None
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.randn(2, 3, 6, 6))
    decay = 0.75
    ema = build_ema(net, decay, "cpu")
    want = None
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()
        net(torch.randn(5, 3, 6, 6) * (step + 1))    # moves BatchNorm's running statistics
        ema.update_parameters(net)
        now = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
        # the first update copies, later ones blend
        want = now if want is None else {k: decay * want[k] + (1 - decay) * now[k] for k in now}
    got = ema.module.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    assert "1.running_mean" in want and int(ema.n_averaged) == 4
    assert not any(p.requires_grad for p in ema.parameters())


def test_skipped_steps_never_reach_the_ema(shards, tmp_path, monkeypatch):
    """Every third backward pass makes NaN gradients: those optimizer steps are skipped, and the
    EMA counts only the applied ones (n_averaged = steps - skipped)."""
    import mlic_dist.train.loop as T

    real = T.train_one_epoch
    calls = {"n": 0}

    def poisoned(run, epoch):
        if not calls.get("hooked"):
            def hook(g):
                calls["n"] += 1
                return g * float("nan") if calls["n"] % 3 == 0 else g
            next(T.unwrap(run.accelerator, run.model).parameters()).register_hook(hook)
            calls["hooked"] = True
        return real(run, epoch)

    monkeypatch.setattr(T, "train_one_epoch", poisoned)
    out = tmp_path / "run"
    result = T.train(load_config(None, overrides(shards, out, **{"train.epochs": 3})))
    state = torch.load(sorted((out / "checkpoints").glob("e*"))[-1] / "state.pt", weights_only=True)
    trainer = state["trainer"]
    assert trainer["skipped_steps"] == result["skipped_steps"] > 0
    assert int(state["ema"]["n_averaged"]) == trainer["global_step"] - trainer["skipped_steps"]
    assert all(torch.isfinite(v).all() for k, v in state["ema"].items() if v.is_floating_point())


@pytest.mark.parametrize("winner", ["ema", "raw"])
def test_the_better_of_raw_and_ema_is_selected_and_saved(shards, tmp_path, monkeypatch, winner):
    """Scripted validation losses (select_metric=val_loss) decide which weights win in the last
    epoch; best_model.pt must then hold exactly those weights of that epoch's checkpoint."""
    import mlic_dist.train.loop as T

    scripted = {"raw": iter([1.0, 0.4 if winner == "raw" else 0.9]), "ema": iter([0.95, 0.5])}
    real = T.evaluate

    def evaluate(run, loader, labels, desc="eval", model=None):
        r = real(run, loader, labels, desc=desc, model=model)
        return {**r, "loss": next(scripted["raw" if model is None else "ema"])}

    monkeypatch.setattr(T, "evaluate", evaluate)
    out = tmp_path / "run"
    result = T.train(load_config(None, overrides(shards, out, **{"train.select_metric": "val_loss"})))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["select_source"] for h in history] == ["ema", winner]
    assert [h["val_loss_ema"] for h in history] == [0.95, 0.5]
    assert all(0 <= h["val_mAP_ema"] <= 1 for h in history)
    assert result["best_source"] == winner and result["best_epoch"] == 1
    assert json.loads((out / "metrics.json").read_text())["best_source"] == winner
    state = torch.load(out / "checkpoints" / "e0002-s0000000" / "state.pt", weights_only=True)
    chosen = ({k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
              if winner == "ema" else state["model"])
    best = torch.load(out / "best_model.pt", weights_only=True)
    assert set(best) == set(chosen) and all(torch.equal(best[k], chosen[k]) for k in best)
    other = state["model"] if winner == "ema" else {k[7:]: v for k, v in state["ema"].items() if k != "n_averaged"}
    assert not all(torch.equal(best[k], other[k]) for k in best)
