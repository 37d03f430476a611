"""The global-batch learning-rate rule and warmup: what 8 GPUs do to the paper's recipe."""
import pytest
import torch

from mlic_dist.train import optim
from mlic_dist.config import load_config
from mlic_dist.models import create_model


def cfg(**kw):
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


def test_linear_scaling_follows_the_global_batch():
    c = cfg(**{"optim.lr": 0.01, "optim.head_lr": 0.1, "data.batch_size_per_gpu": 16,
               "optim.lr_scaling": "linear", "optim.base_batch_size": 16, "train.grad_accum_steps": 2})
    assert optim.global_batch_size(c, 8) == 256
    assert optim.group_lrs(c, 8) == pytest.approx({"backbone": 0.16, "head": 1.6})
    none = cfg(**{"data.batch_size_per_gpu": 16, "optim.base_batch_size": 16, "optim.lr_scaling": "none"})
    assert optim.group_lrs(none, 8) == pytest.approx({"backbone": 0.01, "head": 0.1})
    assert "not scaled" in optim.describe_batch(none, 8) and "global batch 128" in optim.describe_batch(none, 8)


def test_optimizer_groups_get_the_scaled_rates():
    c = cfg(**{"optim.lr_scaling": "linear", "optim.base_batch_size": 16,
               "data.batch_size_per_gpu": 4})  # 4 x 2 procs = 8 = half of 16
    opt = optim.build_optimizer(c, create_model("tiny_cnn", 3), num_processes=2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])


def test_warmup_scales_only_while_stepping_and_reaches_the_schedule():
    c = cfg(**{"optim.warmup_epochs": 0.5})
    model = create_model("tiny_cnn", 3)
    opt = optim.build_optimizer(c, model)
    sched = optim.build_scheduler(c, opt)
    w = optim.Warmup(0.5, steps_per_epoch=10)
    assert w.total_steps == 5 and [w.factor(s) for s in (0, 4, 5)] == pytest.approx([0.2, 1.0, 1.0])
    seen = []
    real_step = opt.step

    def spy(*a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return real_step(*a, **k)

    opt.step = spy
    for step in range(6):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        with w.applied(opt, step):
            opt.step()
        opt.zero_grad()
    assert seen == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01])
    assert opt.param_groups[0]["lr"] == 0.01 and sched.get_last_lr() == pytest.approx([0.01, 0.1])


def test_rescale_changes_current_and_base_rates():
    c = cfg()
    opt = optim.build_optimizer(c, create_model("tiny_cnn", 3))
    sched = optim.build_scheduler(c, opt)
    optim.rescale_lrs(opt, sched, {"backbone": 0.5})
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.1])
    assert sched.base_lrs == pytest.approx([0.005, 0.1])
