"""Backbones, clrun layer types and task heads."""

import math

import pytest
import torch
import torchvision
from fixtures import torchvision_model
from omegaconf import OmegaConf
from torch import nn

from clrun.config import BackboneConfig, LstmConfig, MlpConfig
from clrun.errors import ClrunError
from clrun.models import MultiHead, TaskModel, build_backbone
from clrun.models.backbones import SphereUnit
from clrun.models.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear
from clrun.models.shared_net import SharedNet, shared_layers

CLRUN_TYPES = (Conv2d, Linear, BatchNorm2d, BatchNorm1d)

# name -> (a small width, valid input shapes, out_features at that width)
BACKBONES = {
    "mlp": (1.0, [(1, 28, 28), (3, 32, 32)], 400),
    "lstm": (1.0, [(1, 28, 28), (3, 32, 32)], 128),
    "convnet": (1.0, [(1, 28, 28), (3, 32, 32)], 128),
    "vgg16_bn": (0.25, [(3, 32, 32), (3, 64, 48)], 1024),
    "resnet18": (0.25, [(3, 32, 32), (1, 28, 28)], 128),
    "resnet50": (0.25, [(3, 64, 64)], 512),
    "sphereface20": (0.25, [(3, 112, 112)], 128 * 7 * 7),  # the flattened trunk (112x96: test_sphereface20_layout)
}
CANONICAL = {
    "mlp": (1, 28, 28),
    "lstm": (1, 28, 28),
    "convnet": (1, 28, 28),
    "vgg16_bn": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "resnet50": (3, 224, 224),
    "sphereface20": (3, 112, 96),
}


def config(name: str, **fields):
    schema = {"mlp": MlpConfig, "lstm": LstmConfig}.get(name, BackboneConfig)
    return OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **fields})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_output_shape(name):
    width, shapes, out = BACKBONES[name]
    for shape in shapes:
        model = build_backbone(config(name, width=width), shape).eval()
        assert model.out_features == out
        with torch.no_grad():
            assert model(torch.randn(2, *shape)).shape == (2, out)


@pytest.mark.parametrize("name", BACKBONES)
def test_width_scales_parameters(name):
    shape = CANONICAL[name]
    full = build_backbone(config(name), shape)
    half = build_backbone(config(name, width=0.5), shape)
    assert n_params(half) < n_params(full) / 2
    assert half.out_features == full.out_features // 2


def test_mlp_width_doubles_hidden_units():
    model = build_backbone(config("mlp", hidden=[100, 50], width=2.0), (1, 28, 28))
    assert [m.out_features for m in model.modules() if isinstance(m, Linear)] == [200, 100]
    assert model.out_features == 100


@pytest.mark.parametrize("name", BACKBONES)
def test_layers_are_clrun_types(name):
    width, shapes, _ = BACKBONES[name]
    model = build_backbone(config(name, width=width), shapes[0])
    for m in model.modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if own or isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            assert type(m) in (*CLRUN_TYPES, nn.PReLU, nn.LSTM), type(m)


def test_vgg16_bn_layout_and_parameter_count():
    model = build_backbone(config("vgg16_bn"), (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert count(model, nn.BatchNorm2d) == 13
    assert count(model, nn.MaxPool2d) == 5
    assert count(model, nn.Linear) == 2
    assert count(model, nn.Dropout) == 0
    channels = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    conv = sum(9 * c_in * c_out for c_in, c_out in zip([3, *channels[:-1]], channels, strict=True))
    bn = sum(2 * c for c in channels)
    fc = 512 * 4096 + 4096 + 4096 * 4096 + 4096
    assert n_params(model) == conv + bn + fc
    assert model.out_features == 4096


def test_vgg16_bn_flatten_follows_input_shape():
    model = build_backbone(config("vgg16_bn", width=0.25), (3, 64, 96))
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.in_features == 128 * 2 * 3


def test_resnet18_is_torchvision_resnet18_with_cifar_stem():
    model = build_backbone(config("resnet18"), (3, 32, 32)).eval()
    tv = torchvision.models.resnet18().eval()
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = nn.Identity()
    tv.fc = nn.Identity()
    tv.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))


def test_sphereface20_layout():
    model = build_backbone(config("sphereface20"), (3, 112, 96))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(c.bias is not None for c in convs)
    assert [c.stride for c in convs].count((2, 2)) == 4
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 20  # per channel: one slope per channel of its stage
    assert sum(p.num_parameters for p in prelus) == 64 * 3 + 128 * 5 + 256 * 9 + 512 * 3
    assert not [m for m in model.modules() if isinstance(m, nn.Linear)]  # CPG: fc5 is the face task's head
    assert model.out_features == 512 * 7 * 6
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 96)).shape == (1, 512 * 7 * 6)


def test_sphereface_units_have_identity_skip():
    unit = SphereUnit(4)
    with torch.no_grad():
        for conv in (unit.conv1, unit.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
        x = torch.randn(2, 4, 6, 6)
        assert torch.equal(unit(x), x)


@pytest.mark.parametrize(
    ("name", "shape", "words"),
    [
        ("sphereface20", (3, 32, 32), ["backbone.name=sphereface20", "112x96", "112x112", "3x32x32"]),
        ("vgg16_bn", (1, 28, 28), ["backbone.name=vgg16_bn", "32x32", "1x28x28"]),
        ("convnet", (1, 4, 4), ["backbone.name=convnet", "8x8", "1x4x4"]),
        ("alexnet", (3, 32, 32), ["backbone.name", "alexnet", "resnet50", "sphereface20"]),
    ],
)
def test_bad_name_or_shape_is_one_line_error(name, shape, words):
    with pytest.raises(ClrunError) as err:
        build_backbone(config(name), shape)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory):
    """A torchvision ResNet50 with non-default BN statistics, and the path of its saved state_dict."""
    tv = torchvision_model("resnet50")
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_resnet50_state_dict_matches_torchvision(torchvision_resnet50):
    tv, _ = torchvision_resnet50
    ours = build_backbone(config("resnet50"), (3, 224, 224)).state_dict()
    theirs = {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_resnet50_loads_torchvision_weights(torchvision_resnet50):
    tv, path = torchvision_resnet50
    model = build_backbone(config("resnet50", pretrained=str(path)), (3, 64, 64)).eval()
    theirs = tv.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    x = torch.randn(2, 3, 64, 64)
    tv.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))


def test_pretrained_of_another_width_is_rejected(torchvision_resnet50):
    _, path = torchvision_resnet50
    with pytest.raises(ClrunError, match="backbone.pretrained: .* does not fit backbone.name=resnet50"):
        build_backbone(config("resnet50", width=0.5, pretrained=str(path)), (3, 64, 64))


def test_missing_pretrained_file(tmp_path):
    path = str(tmp_path / "absent.pth")
    with pytest.raises(ClrunError) as err:
        build_backbone(config("convnet", pretrained=path), (1, 28, 28))
    assert str(err.value) == f"backbone.pretrained: file not found: {path}"


def test_pretrained_round_trip_for_other_backbones(tmp_path):
    source = build_backbone(config("convnet"), (1, 28, 28))
    path = tmp_path / "convnet.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone(config("convnet", pretrained=str(path)), (1, 28, 28))
    theirs = source.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_multihead_routes_to_task_head():
    heads = MultiHead()
    assert heads.add(4, 2) == 0
    assert heads.add(4, 3) == 1
    assert all(type(h) is Linear for h in heads.heads)
    with torch.no_grad():
        for t, head in enumerate(heads.heads):
            head.weight.fill_(t + 1.0)
            head.bias.zero_()
    features = torch.ones(5, 4)
    assert torch.equal(heads(features, 0), torch.full((5, 2), 4.0))
    assert torch.equal(heads(features, 1), torch.full((5, 3), 8.0))


def test_task_model_heads_sit_on_backbone():
    model = TaskModel(build_backbone(config("mlp", hidden=[16]), (1, 8, 8)))
    assert model.add_head(2) == 0
    assert model.add_head(5) == 1
    assert model.heads.heads[1].in_features == 16
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.features(x), model.backbone(x))
    for t, n in enumerate((2, 5)):
        assert model(x, t).shape == (3, n)
        assert torch.equal(model(x, t), model.heads.heads[t](model.backbone(x)))


def test_task_model_adds_heads_on_backbone_device():
    model = TaskModel(build_backbone(config("mlp", hidden=[16]), (1, 8, 8))).to("meta")
    model.add_head(2)
    assert model.heads.heads[0].weight.device.type == "meta"


def test_cpg_init_draws_each_layer_type_as_the_official_code():
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": "vgg16_bn", "width": 0.5, "init": "cpg"})
    torch.manual_seed(0)
    model = TaskModel(build_backbone(cfg, (3, 32, 32)))
    model.add_head(5)
    convs = [m for m in model.backbone.modules() if isinstance(m, Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(convs) == 13 and len(linears) == 3  # two hidden layers and the head
    for conv in convs:  # Kaiming-normal, fan_out, ReLU gain: std sqrt(2 / (out channels x kernel area))
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_out)
    for linear in linears:  # N(0, 0.01), bias 0: the head too
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not linear.bias.any()
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and not m.bias.any() for m in norms)
    default = build_backbone(OmegaConf.merge(cfg, {"init": "torch"}), (3, 32, 32))
    first = next(m for m in default.modules() if isinstance(m, Linear))
    assert first.weight.std().item() > 0.02  # PyTorch's default is another draw: 1 / sqrt(3 x fan_in)


def test_grown_weights_start_by_the_same_rule():
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": "vgg16_bn", "width": 0.25, "init": "cpg"})

    def build(channels: float):
        return build_backbone(OmegaConf.merge(cfg, {"width": 0.25 * channels}), (3, 32, 32))

    torch.manual_seed(0)
    net = SharedNet(build)
    net.begin_task(1, picking=False)
    net.heads.add(net.backbone.out_features, 5)
    net.end_task(1)
    old = {name: layer.weight.shape for name, layer in shared_layers(net.backbone).items()}
    net.grow(4.0)  # channels x2
    for name, layer in shared_layers(net.backbone).items():
        rows, cols = old[name][:2]
        new = torch.cat([layer.weight[rows:].flatten(), layer.weight[:rows, cols:].flatten()])
        if isinstance(layer, Conv2d):
            fan_out = layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
            assert new.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)
        else:
            assert new.std().item() == pytest.approx(0.01, rel=0.15)


@pytest.mark.parametrize("multiplier, shared", [(1.0, 33_584_832), (1.5, 50_350_644), (2.0, 67_152_663)])
def test_grown_vgg16_widths_truncate_as_cpgs_code(multiplier, shared):
    """Channels int(c * sqrt(m)) (64 -> 78, 128 -> 156, 256 -> 313, 4096 -> 5016 at 1.5): CPG's shared-weight counts,
    x1.499 (CPG, max 1.5) and x1.9995 (PAE, max 2.0) of 33,584,832."""
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": "vgg16_bn", "width": math.sqrt(multiplier)})
    with torch.device("meta"):
        backbone = build_backbone(cfg, (3, 32, 32))
    assert sum(layer.weight.numel() for layer in shared_layers(backbone).values()) == shared
