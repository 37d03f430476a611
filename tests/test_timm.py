"""model.backbone=timm/NAME: timm's architectures under our head, weights from local files only,
through the trainer, the sweep checks and export. timm's tiny `test_*` models, from scratch; no
network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlic_dist.errors import UserError
from mlic_dist.models import ModelError, MissingWeightsError, check_pretrained, create_model
from shard_fixtures import build_small_shards, tiny_run_overrides

timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]


def test_a_timm_model_is_its_features_under_our_head():
    torch.manual_seed(0)
    model = create_model("timm/test_convnext", 5, dropout=0.2)
    ref = timm.create_model("test_convnext", num_classes=0)
    assert model.head.in_features == ref.num_features and model.head.out_features == 5
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.2
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref.load_state_dict(model.body.state_dict())
        assert torch.allclose(model(x), model.head(ref.eval()(x)), atol=1e-6)
    backbone, head = model.param_groups()    # optim.lr vs optim.head_lr: the body, then the new head
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in backbone} == {id(p) for p in model.body.parameters()}


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "test_mambaout", "test_vit3"])
def test_heads_fit_pre_logits_widths_and_fixed_size_models(arch):
    """The features timm gives with num_classes=0 are head_hidden_size wide where a model has one
    (MobileNetV3: 1024, not num_features 288); a ViT made for 160 px is built for data.size."""
    model = create_model(f"timm/{arch}", 4, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_sync_batchnorm_keeps_timms_fused_activations():
    from timm.layers import BatchNormAct2d

    from mlic_dist.models import convert_sync_batchnorm

    model = create_model("timm/test_efficientnet", 3)
    acts = [m.act for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert acts and not all(isinstance(a, torch.nn.Identity) for a in acts)
    synced = convert_sync_batchnorm(model, "timm/test_efficientnet")
    kept = [m.act for m in synced.modules() if hasattr(m, "act") and isinstance(m, torch.nn.SyncBatchNorm)]
    assert [type(a) for a in kept] == [type(a) for a in acts]     # torch's converter drops them


def test_gradient_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 3)).float()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model("timm/test_vit", 3, grad_checkpointing=ckpt)
        model.train()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.body.grad_checkpointing is True
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(ModelError, match="needs a timm backbone"):
        create_model("tiny_cnn", 3, grad_checkpointing=True)
    with pytest.raises(ModelError, match="vgg11 has no gradient checkpointing"):
        create_model("timm/vgg11", 3, grad_checkpointing=True)


@pytest.mark.parametrize("layout", ["safetensors", "train.py checkpoint"])
def test_a_local_timm_weight_file_loads_into_the_body(tmp_path, layout):
    """timm's own key layout with its 1000-class classifier: the body gets every weight, the
    head starts fresh. The Hugging Face hub's model.safetensors, or a .pth from timm's train.py
    (weights under state_dict, DDP's module. prefix)."""
    torch.manual_seed(1)
    src = timm.create_model("test_convnext", num_classes=1000)
    sd = src.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "checkpoint-9.pth.tar"
        torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    check_pretrained("timm/test_convnext", str(path))
    model = create_model("timm/test_convnext", 4, pretrained=str(path))
    body = model.body.state_dict()
    kept = [k for k in sd if not k.startswith("head.fc.")]
    assert kept and all(torch.equal(body[k], sd[k]) for k in kept)
    assert model.head.weight.shape == (4, src.num_features)
    with pytest.raises(ModelError, match=rf"{path.name} does not fit"):
        create_model("timm/test_vit", 4, pretrained=str(path))     # another architecture's file


def test_weights_whose_head_has_more_than_a_classifier_load(tmp_path):
    """LeViT's head is a BatchNorm + Linear (and a distillation head): all of it is skipped, the
    body gets every weight; a ViT file made for 160 px stops with a ModelError at 64 px."""
    src = timm.create_model("levit_128s")
    path = tmp_path / "levit.pth"
    torch.save(src.state_dict(), path)
    model = create_model("timm/levit_128s", 4, pretrained=str(path), image_size=224)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.body.state_dict().items())
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit3").state_dict(), vit)
    with pytest.raises(ModelError, match=r"vit\.pth does not fit timm/test_vit3 at data.size=64: size mismatch"):
        create_model("timm/test_vit3", 4, pretrained=str(vit), image_size=64)


def test_weights_are_never_downloaded_and_a_missing_file_is_named(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"not downloaded at run time.*huggingface-cli download timm/test_vit"):
        check_pretrained("timm/test_vit", "imagenet")
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        check_pretrained("timm/test_vit", str(missing))
    with pytest.raises(ModelError, match=r"'convnxt_tiny' is not one of timm's \d+ architectures.*convnext_tiny"):
        create_model("timm/convnxt_tiny", 3)
    assert issubclass(MissingWeightsError, UserError)


def test_a_sweep_grids_timm_and_torchvision_backbones(tmp_path):
    import yaml

    from mlic_dist.sweep.spec import SweepError, load_sweep

    shards = build_small_shards(tmp_path / "data")
    for grid, ok in ((["tiny_cnn", "timm/test_resnet"], True), (["tiny_cnn", "timm/test_resnett"], False)):
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({
            "data": {"shards": str(shards), "loader": "torch", "size": 32},
            "model": {"backbone": "tiny_cnn", "pretrained": "none"}, "train": {"epochs": 1},
            "grid": {"model.backbone": grid}, "sweep": {"root": str(tmp_path / "runs")}}))
        if ok:
            assert sorted(t.cfg.model.backbone for t in load_sweep(sweep).trials()) == sorted(grid)
        else:
            with pytest.raises(SweepError, match=r"'test_resnett' is not one of timm's .*test_resnet"):
                load_sweep(sweep)
    sweep.write_text(yaml.safe_dump({                # timm + imagenet: refused before any trial starts
        "data": {"shards": str(shards), "loader": "torch", "size": 32},
        "model": {"backbone": "tiny_cnn", "pretrained": "imagenet"}, "train": {"epochs": 1},
        "grid": {"model.backbone": ["timm/test_resnet"]}, "sweep": {"root": str(tmp_path / "runs")}}))
    with pytest.raises(SweepError, match=r"timm/test_resnet.*not downloaded at run time"):
        load_sweep(sweep)


@pytest.mark.slow
def test_a_timm_backbone_trains_and_exports(tmp_path):
    """python -m mlic_dist.train with timm/test_convnext writes an ordinary run directory; the
    ONNX export's own check against PyTorch passes; `python -m mlic_dist.models` lists timm."""
    shards = build_small_shards(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlic_dist.train",
           *tiny_run_overrides(shards, out, **{"model.backbone": "timm/test_convnext", "tracking.enabled": "false",
                                              "model.grad_checkpointing": "true"})]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["train_loss"] == h["train_loss"] for h in history)
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved["backbone"] == "timm/test_convnext" and saved["grad_checkpointing"] is True
    onnx_file = tmp_path / "model.onnx"
    p = subprocess.run([sys.executable, "-m", "mlic_dist.export", "--run-dir", str(out), "--format", "onnx",
                        "--out", str(onnx_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.splitlines()[-1])["max_abs_diff"] < 1e-3
    p = subprocess.run([sys.executable, "-m", "mlic_dist.models"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and f"any of timm's {len(timm.list_models())} architectures" in p.stdout


def test_an_ensemble_of_timm_runs_is_named_without_a_slash():
    from mlic_dist.ensemble.selection import Group

    key = json.dumps({"model.backbone": "timm/test_vit", "data.augment": "M1", "seed": 0}, sort_keys=True)
    name = Group("scale", key, [], "data.size").name
    assert name.startswith("scale-timm_test_vit-M1-seed0-") and "/" not in name


def test_input_size_and_normalisation_come_from_timms_pretrained_cfg_unless_set(tmp_path):
    """A ViT gets its 224 px and 0.5 / 0.5, a TResNet its 0..1 pixels, a CLIP tower CLIP's mean,
    where the config sets neither; what the config sets is kept; torchvision keeps our defaults;
    a sweep's grid point resolves per backbone; a mean no preset has (DPN) is one ConfigError."""
    import yaml

    from mlic_dist.config import ConfigError, load_config, to_dict
    from mlic_dist.config.choices import MEAN_STD
    from mlic_dist.sweep.spec import load_sweep

    def resolved(*overrides):
        cfg = load_config(None, list(overrides))
        return cfg.data.size, cfg.data.normalize

    for arch in ("vit_tiny_patch16_224", "tresnet_m", "vit_base_patch16_clip_224", "efficientnet_b3"):
        pc = timm.models.get_pretrained_cfg(arch)
        size, preset = resolved(f"model.backbone=timm/{arch}")
        assert size == pc.input_size[-1]
        mean, std = MEAN_STD[preset]
        assert [m / 255 for m in mean + std] == pytest.approx(list(pc.mean + pc.std), abs=1e-6)
    assert resolved("model.backbone=timm/vit_tiny_patch16_224", "data.size=96") == (96, "half")
    assert resolved("model.backbone=timm/efficientnet_b3", "data.normalize=half") == (288, "half")
    assert resolved("model.backbone=resnet50") == (448, "imagenet")
    saved = tmp_path / "config.yaml"                 # a run's own record reads back unchanged
    saved.write_text(yaml.safe_dump(to_dict(load_config(None, ["model.backbone=timm/tresnet_m", "data.size=64"]))))
    assert load_config(saved).data.size == 64
    with pytest.raises(ConfigError, match=r"timm/dpn68: its pretrained_cfg normalises with mean .* set data.normalize"):
        load_config(None, ["model.backbone=timm/dpn68"])
    shards = build_small_shards(tmp_path / "data")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "data": {"shards": str(shards), "loader": "torch"}, "model": {"pretrained": "none"},
        "train": {"epochs": 1}, "grid": {"model.backbone": ["tiny_cnn", "timm/vit_tiny_patch16_224"]},
        "sweep": {"root": str(tmp_path / "runs")}}))
    sizes = {t.cfg.model.backbone: (t.cfg.data.size, t.cfg.data.normalize) for t in load_sweep(sweep).trials()}
    assert sizes == {"tiny_cnn": (448, "imagenet"), "timm/vit_tiny_patch16_224": (224, "half")}


def test_tta_sizes_a_fixed_size_model_cannot_take_are_one_error_line():
    """A ViT built for data.size refuses other --tta sizes before scoring (not a traceback midway);
    a CNN takes them."""
    from mlic_dist.ensemble.tta import check_sizes
    from mlic_dist.predict import PredictError

    vit = create_model("timm/test_vit3", 3, image_size=32).eval()
    check_sizes(vit, "timm/test_vit3", 32, [32])
    with pytest.raises(PredictError, match=r"--tta size 48: timm/test_vit3 takes only its data.size=32 px"):
        check_sizes(vit, "timm/test_vit3", 32, [32, 48], PredictError)
    check_sizes(create_model("timm/test_resnet", 3).eval(), "timm/test_resnet", 32, [32, 48, 64], PredictError)
