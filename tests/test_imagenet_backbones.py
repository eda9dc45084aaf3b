"""ImageNet stems: torchvision's layout and weights (backbone.stem, .pretrained, .imagenet_head)."""

import math
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import build_method, clrun, compose_config
from fixtures import torchvision_model
from omegaconf import OmegaConf
from torch import nn

from clrun.errors import ClrunError
from clrun.models import TaskModel, build_backbone
from clrun.models.shared_net import SharedNet

HEADS = {"resnet18": "fc", "resnet50": "fc", "vgg16_bn": "classifier.6"}  # torchvision's ImageNet classifier
FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth", "vgg16_bn": "vgg16_bn-6c64b313.pth"}


def backbone_cfg(name: str, *overrides: str):
    return compose_config(f"backbone={name}", *(f"backbone.{o}" for o in overrides)).backbone


def penultimate(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """torchvision's features before its ImageNet classifier."""
    with torch.no_grad():
        if name == "vgg16_bn":
            return model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))
        model.fc, fc = nn.Identity(), model.fc
        out = model(x)
        model.fc = fc
        return out


@pytest.mark.parametrize("name", HEADS)
def test_imagenet_stem_is_torchvision_and_loads_its_weights(tmp_path, name):
    tv = torchvision_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    ours = build_backbone(backbone_cfg(name, "stem=imagenet", f"pretrained={path}"), (3, 64, 64)).eval()
    head = HEADS[name]
    theirs = {n: m for n, m in tv.named_modules() if n != head}
    assert [n for n, _ in ours.named_modules()] == list(theirs)
    for n, m in ours.named_modules():  # torch.nn's layers are clrun's subclasses of them; blocks are clrun's own
        assert type(theirs[n]).__module__.startswith("torchvision") or isinstance(m, type(theirs[n])), n
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith(f"{head}.")}
    assert list(ours.state_dict()) == list(state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), penultimate(tv, name, x), atol=1e-5, rtol=1e-5)


def test_default_stems_are_unchanged():
    assert build_backbone(backbone_cfg("resnet18"), (3, 32, 32)).conv1.kernel_size == (3, 3)
    assert build_backbone(backbone_cfg("resnet50"), (3, 64, 64)).conv1.kernel_size == (7, 7)
    vgg = build_backbone(backbone_cfg("vgg16_bn", "width=0.25"), (3, 32, 32))
    assert vgg.features[0].bias is None and "classifier.1.weight" in vgg.state_dict()
    resnet18 = build_backbone(backbone_cfg("resnet18", "stem=imagenet"), (3, 64, 64))
    assert resnet18.conv1.kernel_size == (7, 7) and isinstance(resnet18.maxpool, nn.MaxPool2d)


def hub_file(tmp_path: Path, name: str) -> Path:
    return tmp_path / "hub" / "checkpoints" / FILES[name]


def test_pretrained_imagenet_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ClrunError) as err:
        build_backbone(backbone_cfg("resnet18", "stem=imagenet", "pretrained=imagenet"), (3, 64, 64))
    path = hub_file(tmp_path, "resnet18")
    assert str(err.value) == (
        f"backbone.pretrained=imagenet: {path.name} is missing: put torchvision's file "
        f"(https://download.pytorch.org/models/{path.name}) into {path.parent}/ (TORCH_HOME moves it; nothing is "
        "downloaded), or set backbone.pretrained=<path>"
    )
    assert "\n" not in str(err.value)


def test_pretrained_imagenet_loads_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tv = torchvision_model("resnet18")
    path = hub_file(tmp_path, "resnet18")
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    ours = build_backbone(backbone_cfg("resnet18", "stem=imagenet", "pretrained=imagenet"), (3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), penultimate(tv, "resnet18", x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["stem=imagenet", "width=0.5"],
            "backbone.pretrained=imagenet needs backbone.stem=imagenet and backbone.width=1 (got stem=imagenet, "
            "width=0.5)",
        ),
        (
            ["stem=cifar"],
            "backbone.pretrained=imagenet needs backbone.stem=imagenet and backbone.width=1 (got stem=cifar",
        ),
    ],
)
def test_pretrained_imagenet_needs_the_imagenet_stem_at_width_1(overrides, message):
    with pytest.raises(ClrunError) as err:
        build_backbone(backbone_cfg("resnet18", "pretrained=imagenet", *overrides), (3, 64, 64))
    assert str(err.value).startswith(message)


def test_a_state_dict_of_another_width_or_stem_is_rejected(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    for overrides in (["stem=imagenet", "width=0.5"], ["stem=cifar"]):
        with pytest.raises(ClrunError, match=r"does not fit backbone.name=resnet18 \(stem=.*\) at width"):
            build_backbone(backbone_cfg("resnet18", f"pretrained={path}", *overrides), (3, 64, 64))


def test_backbones_without_a_stem_choice_refuse_stem_and_imagenet_weights():
    with pytest.raises(ClrunError, match="backbone.stem: only resnet18, resnet50, vgg16_bn have a choice of stem"):
        build_backbone(backbone_cfg("convnet", "stem=imagenet"), (3, 32, 32))
    with pytest.raises(ClrunError, match="torchvision's ImageNet weights exist for resnet18, resnet50, vgg16_bn"):
        build_backbone(backbone_cfg("convnet", "pretrained=imagenet"), (3, 32, 32))


@pytest.fixture
def resnet18_file(tmp_path):
    tv = torchvision_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_imagenet_head_is_task_0s_head(resnet18_file):
    tv, path = resnet18_file
    backbone = build_backbone(
        backbone_cfg("resnet18", "stem=imagenet", f"pretrained={path}", "imagenet_head=true"), (3, 64, 64)
    )
    model = TaskModel(backbone).eval()
    assert model.add_head(1000) == 0 and model.add_head(10) == 1
    assert torch.equal(model.heads.heads[0].weight, tv.fc.weight) and torch.equal(model.heads.heads[0].bias, tv.fc.bias)
    assert not torch.equal(model.heads.heads[1].weight, tv.fc.weight[:10])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), tv(x), atol=1e-5, rtol=1e-5)
    assert "imagenet_head" not in "".join(model.state_dict())


def test_imagenet_head_errors(resnet18_file, tmp_path):
    _, path = resnet18_file
    cfg = backbone_cfg("resnet18", "stem=imagenet", f"pretrained={path}", "imagenet_head=true")
    with pytest.raises(ClrunError, match="pretrained classifier of 1000 classes, but task 0 has 10"):
        TaskModel(build_backbone(cfg, (3, 64, 64))).add_head(10)
    with pytest.raises(ClrunError, match="backbone.imagenet_head=true needs backbone.pretrained"):
        build_backbone(backbone_cfg("resnet18", "imagenet_head=true"), (3, 64, 64))
    trunk = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in torch.load(path).items() if not k.startswith("fc.")}, trunk)
    with pytest.raises(ClrunError, match="holds no classifier on the 512 features of backbone.name=resnet18"):
        build_backbone(
            backbone_cfg("resnet18", "stem=imagenet", f"pretrained={trunk}", "imagenet_head=true"), (3, 64, 64)
        )


@pytest.mark.parametrize("name, width", [("resnet18", 0.25), ("resnet50", 0.125), ("vgg16_bn", 0.125)])
def test_shared_net_learns_and_grows_an_imagenet_stem(name, width):
    """PackNet's pattern: task 0 trains, prunes and freezes; growth widens; task 1 runs; task 0's view is unchanged."""
    cfg = backbone_cfg(name, "stem=imagenet", f"width={width}")

    def build(channels: float) -> nn.Module:
        return build_backbone(OmegaConf.merge(cfg, {"width": width * channels}), (3, 64, 64))

    torch.manual_seed(0)
    net = SharedNet(build)
    x = torch.randn(2, 3, 64, 64)
    net.begin_task(1, picking=False)
    head = net.heads.add(net.backbone.out_features, 5)
    net.forward_current(x, head).sum().backward()
    assert all(w.grad is not None for w in net.shared_weights())
    net.prune(1, 0.5)
    net.end_task(1)
    net.eval()
    with torch.no_grad():
        before = net.predict(x, 0)
    net.grow(2.0)
    assert net.backbone.out_features == build(math.sqrt(2.0)).out_features > net.heads.heads[0].in_features
    net.begin_task(2, picking=True)
    net.heads.add(net.backbone.out_features, 5)
    net.train()
    assert net.forward_current(x, 1).shape == (2, 5)
    net.end_task(2)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.predict(x, 0), before)


def small_classifier_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    """torchvision's resnet18 with a 2-class classifier, to be task 0's head of a 2-class synthetic task."""
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    path = tmp_path / "resnet18-2.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


PRETRAINED_STREAM = ["hardware=cpu", "stream.n_tasks=2", "stream.train_per_task=8", "stream.test_per_task=4"]


@pytest.mark.parametrize("method", ["packnet", "cpg", "scratch", "finetune"])
def test_methods_start_task_0s_head_only_from_the_pretrained_classifier(tmp_path, method):
    tv, path = small_classifier_file(tmp_path)
    backbone = [
        "backbone=resnet18",
        "backbone.stem=imagenet",
        f"backbone.pretrained={path}",
        "backbone.imagenet_head=true",
    ]
    built, stream, _ = build_method(None, f"method={method}", *PRETRAINED_STREAM, *backbone)
    if method in ("packnet", "cpg"):  # the shared net: every pretrained weight loaded, task 0's head the classifier
        heads = [built.net.heads.heads[built.add_head(task)] for task in stream.tasks]
        assert torch.equal(built.net.backbone.conv1.weight, tv.conv1.weight)
    elif method == "scratch":  # one model per task: only the first starts from the classifier
        heads = [built.new_model([task], scenario="task").heads.heads[0] for task in stream.tasks]
    else:
        built.model.add_head(2), built.model.add_head(2)
        heads = list(built.model.heads.heads)
    assert torch.equal(heads[0].weight.cpu(), tv.fc.weight) and torch.equal(heads[0].bias.cpu(), tv.fc.bias)
    assert not torch.equal(heads[1].weight.cpu(), tv.fc.weight)


def test_methods_with_their_own_heads_refuse_imagenet_head_in_one_line(tmp_path):
    _, path = small_classifier_file(tmp_path)
    backbone = ["backbone=resnet18", "backbone.stem=imagenet", f"backbone.pretrained={path}"]
    done = clrun(tmp_path, "method=pnn", *PRETRAINED_STREAM, *backbone, "backbone.imagenet_head=true")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "backbone.imagenet_head=true: method pnn builds its own heads" in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("summary.parquet"))
