"""mlic_dist.losses: each loss against a float64 evaluation of its formula (ignore entries left
out, mean over the rest), finite under fp16/bf16 autocast at logits of +-1e4, one scale for the
training loss and the validation loss (sum / count over the non-ignored entries)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlic_dist.config import ConfigError, LossConfig, load_config
from mlic_dist.losses import build_loss

CASES = {
    "bce": LossConfig(name="bce"),
    "asl": LossConfig(name="asl"),                                   # 4, 0, clip 0.05
    "asl_g1_noclip": LossConfig(name="asl", gamma_neg=2.0, gamma_pos=1.0, clip=0.0),
    "asl_g05": LossConfig(name="asl", gamma_neg=0.5, gamma_pos=0.5, clip=0.1),
    "focal": LossConfig(name="focal"),                               # gamma 2, alpha 0.25
    "focal_noalpha": LossConfig(name="focal", gamma=0.5, alpha=-1),
}


def reference(cfg: LossConfig, x: np.ndarray, t: np.ndarray, m: np.ndarray) -> float:
    """The papers' formulas, element by element in float64 (probability space, no tricks)."""
    p = 1.0 / (1.0 + np.exp(-x))
    if cfg.name == "bce":
        e = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    elif cfg.name == "focal":
        pt = np.where(t == 1, p, 1 - p)
        at = 1.0 if cfg.alpha < 0 else np.where(t == 1, cfg.alpha, 1 - cfg.alpha)
        e = -at * (1 - pt) ** cfg.gamma * np.log(pt)
    else:
        pm = np.maximum(p - cfg.clip, 0.0)
        pos = -((1 - p) ** cfg.gamma_pos) * np.log(p)
        neg = -(pm ** cfg.gamma_neg) * np.log(1 - pm)
        e = np.where(t == 1, pos, neg)
    return float((e * m).sum() / m.sum())


def limit(cfg: LossConfig, x: np.ndarray, t: np.ndarray, m: np.ndarray) -> float:
    """`reference`'s formulas in float64 where its probability-space terms underflow (logits of
    +-1e4): p and 1 - p each from their own log-sigmoid, log p = -log(1 + e^-x), so log p and
    log(1 - p) stay finite where p rounds to 1 or 0. Equal to `reference` wherever that is
    finite."""
    log_p, log_q = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)        # log p, log(1 - p)
    p, q = np.exp(log_p), np.exp(log_q)
    if cfg.name == "bce":
        e = -(t * log_p + (1 - t) * log_q)
    elif cfg.name == "focal":
        log_pt, not_pt = np.where(t == 1, log_p, log_q), np.where(t == 1, q, p)
        at = 1.0 if cfg.alpha < 0 else np.where(t == 1, cfg.alpha, 1 - cfg.alpha)
        e = -at * not_pt ** cfg.gamma * log_pt
    else:
        pm = np.maximum(p - cfg.clip, 0.0)
        log_not_pm = np.log(np.minimum(q + cfg.clip, 1.0)) if cfg.clip > 0 else log_q   # log(1 - p_m)
        pos = -(q ** cfg.gamma_pos) * log_p
        neg = -(pm ** cfg.gamma_neg) * log_not_pm
        e = np.where(t == 1, pos, neg)
    return float((e * m).sum() / m.sum())


def random_batch(seed=0, b=16, c=7, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = (torch.rand(b, c, generator=g) < 0.35).double()
    m = (torch.rand(b, c, generator=g) > 0.2).double()   # ~20 % ignore entries
    m[0] = 0                                              # one image with everything ignored
    return x, t, m


@pytest.mark.parametrize("case", list(CASES))
def test_the_limit_is_the_formula_where_both_are_finite(case):
    x, t, m = (a.numpy() for a in random_batch(4, scale=6.0))
    assert limit(CASES[case], x, t, m) == pytest.approx(reference(CASES[case], x, t, m), rel=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_formula_in_float64(case):
    cfg = CASES[case]
    fn = build_loss(cfg)
    for seed in range(3):
        x, t, m = random_batch(seed)
        want = reference(cfg, x.numpy(), t.numpy(), m.numpy())
        got32 = fn(x.float(), t.float(), m.float()).item()
        assert got32 == pytest.approx(want, rel=2e-6, abs=1e-7)
        # the entries are the per-element losses, zero where ignored
        e = fn.entries(x.float(), t.float(), m.float())
        assert e.shape == x.shape and e.dtype == torch.float32 and (e[m == 0] == 0).all()
    # the ignore mask matters: the same batch without it is another number
    assert fn(x.float(), t.float(), torch.ones_like(m).float()).item() != pytest.approx(want, rel=1e-3)


def test_focal_agrees_with_torchvision():
    from torchvision.ops import sigmoid_focal_loss

    x, t, m = random_batch(5)
    for gamma, alpha in ((2.0, 0.25), (1.0, -1.0), (3.0, 0.5)):
        ref = (sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none") * m).sum() / m.sum()
        got = build_loss(LossConfig(name="focal", gamma=gamma, alpha=alpha))(x, t, m)
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)   # ours computes in float32


def test_bce_scale_is_torch_mean_when_nothing_is_ignored():
    x, t, _ = random_batch(1)
    ones = torch.ones_like(t)
    want = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="mean")
    assert build_loss(LossConfig())(x, t, ones).item() == pytest.approx(want.item(), rel=1e-6)


def _naive_asl(x, y, gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8):
    """ASL's repository formula, probability space (the NaN reports under fp16)."""
    xs_pos = torch.sigmoid(x)
    xs_neg = (1 - xs_pos + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    return -(loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_finite_under_autocast_at_extreme_logits(case, dtype):
    """Logits of +-1e4 from a layer run under CPU autocast (fp16 / bf16 outputs): loss and
    gradients finite, and equal to the float64 formula's limit where that is finite."""
    lin = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0],
                                       [0, -1, 0, 0], [0, 0, 1, 0], [0, 0, -1, 0]]))
    inp = torch.tensor([[1e4, 1e4, 0.5, 3.0], [1e4, -1e4, -2.0, 0.1]])
    t = torch.tensor([[1.0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1]])   # right, wrong, ... at +-1e4
    m = torch.ones_like(t)
    with torch.autocast("cpu", dtype=dtype):
        logits = lin(inp)
    assert logits.dtype == dtype and logits.abs().max() >= 9000
    fn = build_loss(CASES[case])
    loss = fn(logits, t, m)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lin.weight.grad).all()
    # the formula's value at the logits autocast produced (1e4 rounds to 9984 in bf16): confidently
    # wrong entries cost |x| (their log p is -x), right ones nothing
    want = limit(CASES[case], logits.detach().double().numpy(), t.double().numpy(), m.double().numpy())
    assert math.isfinite(want) and want > 100
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_the_naive_probability_space_asl_is_not_finite_in_fp16():
    """What the test above guards against: ASL's own formula on fp16 logits gives NaN."""
    x = torch.tensor([[1e4, -1e4, 3.0]], dtype=torch.float16, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float16)
    assert not torch.isfinite(_naive_asl(x, y))
    ours = build_loss(LossConfig(name="asl"))(x, y, torch.ones_like(y))
    assert torch.isfinite(ours)


def test_asl_defaults_are_the_published_ones_and_config_validates():
    c = load_config(None, ["loss.name=asl"]).loss
    assert (c.gamma_neg, c.gamma_pos, c.clip) == (4.0, 0.0, 0.05)
    f = load_config(None, ["loss.name=focal"]).loss
    assert (f.gamma, f.alpha) == (2.0, 0.25)
    for bad, needle in (("loss.name=hinge", "loss.name='hinge'"), ("loss.clip=1.5", "loss.clip=1.5"),
                        ("loss.alpha=2", "loss.alpha=2.0"), ("loss.gamma_neg=-1", "loss.gamma_neg=-1.0")):
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- one scale


def _linear_run(shards, tmp_path, loss_name="bce"):
    """A Run around a model without BatchNorm or dropout (train and eval forward are the same
    function) and a learning rate too small to move it: the training epoch's loss and the
    validation pass's loss then measure the same thing on the same images."""
    from mlic_dist.data import build_loader
    from mlic_dist.models import MultiLabelNet
    from mlic_dist.train.optim import build_optimizer
    from mlic_dist.tracking.tracker import Tracker
    from mlic_dist.train.loop import Run, TrainState, build_accelerator

    cfg = load_config(None, [f"data.shards={shards}", "data.size=32", "data.loader=torch", "data.augment=M0",
                             "data.difficult=ignore", "data.batch_size_per_gpu=4", "data.num_workers=1",
                             "optim.name=sgd", "optim.lr=1e-12", "optim.head_lr=1e-12", "optim.momentum=0",
                             f"loss.name={loss_name}", "train.mixed_precision=no", "tracking.enabled=false",
                             f"train.output_dir={tmp_path / 'run'}", "model.channels_last=false"])
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = MultiLabelNet(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()), 48, 4)
    opt = build_optimizer(cfg, model, 1)
    model, opt = acc.prepare(model, opt)
    args = dict(rank=0, world_size=1, device="cpu", seed=0)
    train_loader = build_loader(cfg.data, "train", train=True, **args)
    eval_loader = build_loader(cfg.data, "train", train=False, **args)
    run = Run(cfg, acc, model, opt, None, train_loader, eval_loader, None, ["c0", "c1", "c2", "c3"],
              tmp_path, Tracker(cfg.tracking, tmp_path, active=False), TrainState())
    return run, eval_loader


@pytest.mark.parametrize("loss_name", ["bce", "asl"])
def test_train_and_val_loss_are_the_same_quantity(tmp_path, loss_name):
    from mlic_dist.data.labels import read_split_labels
    from mlic_dist.train.scoring import predict_split
    from mlic_dist.train.loop import train_one_epoch
    from shard_fixtures import build_small_shards

    shards = build_small_shards(tmp_path / "data")
    run, eval_loader = _linear_run(shards, tmp_path, loss_name)
    _, labels = read_split_labels(shards, "train")
    assert (labels == -1).any(1).sum() >= 3   # images with fewer counted entries than others
    probs, val_loss = predict_split(run, eval_loader, len(labels))
    train_loss = train_one_epoch(run, 0)["train_loss"]
    assert train_loss == pytest.approx(val_loss, rel=1e-5)
    # ... and that quantity is the mean over the split's non-ignored entries, not of per-image means
    logits = torch.logit(torch.from_numpy(probs).double(), eps=0)
    t, m = torch.from_numpy(labels == 1).double(), torch.from_numpy(labels != -1).double()
    want = reference(run.cfg.loss, logits.numpy(), t.numpy(), m.numpy())
    per_image = float(np.mean([reference(run.cfg.loss, logits[i:i + 1].numpy(), t[i:i + 1].numpy(),
                                         m[i:i + 1].numpy()) for i in range(len(labels))]))
    assert val_loss == pytest.approx(want, rel=1e-4)
    assert not math.isclose(per_image, want, rel_tol=1e-4)
