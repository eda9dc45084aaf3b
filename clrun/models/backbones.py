"""Backbones: feature extractors built from a `BackboneConfig` node and an input shape.

Every backbone exposes `out_features` and maps (N, C, H, W) inputs to
(N, out_features) features; classifiers live in `clrun.models.heads`. All
convolutions, linear layers and batch norms are clrun layer types; `lstm` reads
images row by row through a `torch.nn.LSTM`.
resnet18, resnet50 and vgg16_bn have a choice of stem (`backbone.stem`); with
the ImageNet one their modules and keys are torchvision's minus the classifier,
so torchvision's ImageNet weights load (`backbone.pretrained=imagenet`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from clrun.errors import ClrunError
from clrun.models.layers import BatchNorm2d, Conv2d, Linear, init_as_cpg

Shape = tuple[int, int, int]


def _scale(c: int, width: float) -> int:
    """`c` channels or units at width multiplier `width`, truncated as CPG's code does (`int(c * sqrt(m))`:
    growth to 1.5x parameters gives 64 -> 78, 128 -> 156, 256 -> 313, 4096 -> 5016); the 1e-6 absorbs float error."""
    return max(1, int(c * width + 1e-6))


def _conv_bn_relu(c_in: int, c_out: int, bias: bool = False) -> list[nn.Module]:
    return [Conv2d(c_in, c_out, 3, padding=1, bias=bias), BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class MLP(nn.Module):
    """Flatten, then Linear + ReLU for each hidden layer."""

    def __init__(self, input_shape: Shape, hidden: list[int]) -> None:
        super().__init__()
        n = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [Linear(n, h), nn.ReLU(inplace=True)]
            n = h
        self.layers = nn.Sequential(*layers)
        self.out_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def rows(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) as sequences of their rows: (N, H, C*W)."""
    return x.permute(0, 2, 1, 3).flatten(2)


class RowLSTM(nn.Module):
    """An LSTM reading an image row by row (H steps of its C*W pixels, sequential MNIST's row variant); its
    features are the hidden state after the last row."""

    def __init__(self, input_shape: Shape, hidden: int) -> None:
        super().__init__()
        c, _, w = input_shape
        self.lstm = nn.LSTM(c * w, hidden, batch_first=True)
        self.out_features = hidden

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden state after each step, (N, steps, hidden), for images (N, C, H, W) or sequences
        (N, steps, C*W)."""
        return self.lstm(rows(x) if x.dim() == 4 else x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequence(x)[:, -1]


class ConvNet(nn.Module):
    """Three blocks of 3x3 conv + BN + ReLU + 2x2 max-pool (32, 64, 128 channels), then global average pool."""

    def __init__(self, in_channels: int, width: float) -> None:
        super().__init__()
        c = in_channels
        layers: list[nn.Module] = []
        for c_out in (_scale(n, width) for n in (32, 64, 128)):
            layers += [*_conv_bn_relu(c, c_out), nn.MaxPool2d(2)]
            c = c_out
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG16-BN: 13 conv + BN + ReLU, 5 max-pools, then two 4096-unit Linear + ReLU.

    `imagenet_stem`: torchvision's `vgg16_bn` without its last Linear `classifier.6` (biased convs, a 7x7
    adaptive average pool, dropout after each Linear + ReLU); otherwise CPG's CIFAR layout (bias-free convs, no
    pool, no dropout).
    """

    def __init__(self, input_shape: Shape, width: float, imagenet_stem: bool = False) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(c, _scale(v, width), bias=imagenet_stem)
                c = _scale(v, width)
        self.features = nn.Sequential(*layers)
        hidden = _scale(4096, width)
        if imagenet_stem:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                Linear(c * 7 * 7, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(),
            )
        else:
            self.avgpool = nn.Identity()
            self.classifier = nn.Sequential(
                nn.Flatten(),
                Linear(c * (h // 32) * (w // 32), hidden),
                nn.ReLU(inplace=True),
                Linear(hidden, hidden),
                nn.ReLU(inplace=True),
            )
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(Conv2d(c_in, c_out, 1, stride, bias=False), BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a skip (torchvision's names)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block, stride on the 3x3 conv (torchvision's v1.5 layout and names)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk with torchvision's module names, no `fc`; ends in global average pooling.

    `imagenet_stem`: 7x7 stride-2 conv + 3x3 max-pool; otherwise the CIFAR stem
    (3x3 stride-1 conv, no pool).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks: list[int],
        in_channels: int,
        width: float,
        imagenet_stem: bool,
    ) -> None:
        super().__init__()
        c = _scale(64, width)
        if imagenet_stem:
            self.conv1 = Conv2d(in_channels, c, 7, 2, 3, bias=False)
        else:
            self.conv1 = Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        for i, n in enumerate(blocks):
            planes = _scale(64 * 2**i, width)
            layer = []
            for j in range(n):
                layer.append(block(c, planes, 2 if i > 0 and j == 0 else 1))
                c = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class SphereUnit(nn.Module):
    """SphereFace residual unit: two 3x3 conv + PReLU, identity skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(c, c, 3, 1, 1)
        self.prelu1 = nn.PReLU(c)
        self.conv2 = Conv2d(c, c, 3, 1, 1)
        self.prelu2 = nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


class SphereFace20(nn.Module):
    """SphereFace-20's convolutional trunk ("sphere20a", Liu et al. 2017; CPG's `spherenet20`), flattened: 20 conv
    layers, 512 x 7 x 7 = 25088 features from 112x112 faces (512 x 7 x 6 from 112x96). As in CPG, the 512-d
    embedding layer (SphereFace's fc5) belongs to the face-verification head (`clrun.models.faces.FaceHead`), and
    the other tasks' heads are linear on the trunk's features."""

    def __init__(self, input_shape: Shape, width: float) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for c_out, units in zip((_scale(n, width) for n in (64, 128, 256, 512)), (1, 2, 4, 1), strict=True):
            layers += [Conv2d(c, c_out, 3, 2, 1), nn.PReLU(c_out)]
            layers += [SphereUnit(c_out) for _ in range(units)]
            c = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out_features = c * (h // 16) * (w // 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _shape_text(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _require_min_size(name: str, shape: Shape, size: int) -> None:
    if shape[1] < size or shape[2] < size:
        raise ClrunError(
            f"backbone.name={name} needs inputs of at least {size}x{size} pixels, got {_shape_text(shape)}"
        )


def _mlp(cfg: DictConfig, shape: Shape) -> nn.Module:
    return MLP(shape, [_scale(h, cfg.width) for h in cfg.hidden])


def _lstm(cfg: DictConfig, shape: Shape) -> nn.Module:
    return RowLSTM(shape, _scale(cfg.hidden, cfg.width))


def _convnet(cfg: DictConfig, shape: Shape) -> nn.Module:
    _require_min_size("convnet", shape, 8)
    return ConvNet(shape[0], cfg.width)


@dataclass(frozen=True)
class Stemmed:
    """A backbone with a choice of stem (`backbone.stem`) and torchvision's ImageNet-1k weights."""

    default: str  # the stem when `backbone.stem` is null
    weights: str  # torchvision's weights enum; its IMAGENET1K_V1 is the legacy `pretrained=True` (CPG's)
    head: str  # the key prefix of torchvision's ImageNet classifier, which the backbone leaves out


STEMMED = {
    "resnet18": Stemmed("cifar", "ResNet18_Weights", "fc."),
    "resnet50": Stemmed("imagenet", "ResNet50_Weights", "fc."),
    "vgg16_bn": Stemmed("cifar", "VGG16_BN_Weights", "classifier.6."),
}


def _choice(cfg: DictConfig, key: str, default: str) -> str:
    """`cfg.<key>`, an enum choice (or its text in a plain config), as text; `default` when absent or null."""
    value = cfg.get(key)
    return default if value is None else str(getattr(value, "value", value))


def _stem(cfg: DictConfig) -> str:
    """`cfg.stem` as text (`cifar` or `imagenet`), the backbone's default when null."""
    return _choice(cfg, "stem", STEMMED[cfg.name].default)


def _head_prefix(name: str) -> str:
    """The key prefix of the classifier a pretrained file of backbone `name` may hold."""
    return STEMMED[name].head if name in STEMMED else "fc."


def _vgg16_bn(cfg: DictConfig, shape: Shape) -> nn.Module:
    _require_min_size("vgg16_bn", shape, 32)
    return VGG16BN(shape, cfg.width, imagenet_stem=_stem(cfg) == "imagenet")


def _resnet18(cfg: DictConfig, shape: Shape) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], shape[0], cfg.width, imagenet_stem=_stem(cfg) == "imagenet")


def _resnet50(cfg: DictConfig, shape: Shape) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], shape[0], cfg.width, imagenet_stem=_stem(cfg) == "imagenet")


def _sphereface20(cfg: DictConfig, shape: Shape) -> nn.Module:
    if shape[1:] not in ((112, 96), (112, 112)):
        raise ClrunError(f"backbone.name=sphereface20 needs inputs of Cx112x96 or Cx112x112, got {_shape_text(shape)}")
    return SphereFace20(shape, cfg.width)


BACKBONES: dict[str, Callable[[DictConfig, Shape], nn.Module]] = {
    "mlp": _mlp,
    "lstm": _lstm,
    "convnet": _convnet,
    "vgg16_bn": _vgg16_bn,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "sphereface20": _sphereface20,
}


# what `build_backbone` returns (`hardware.compile` compiles these inside a method's model)
BACKBONE_TYPES = (MLP, RowLSTM, ConvNet, VGG16BN, ResNet, SphereFace20)


def _imagenet_file(cfg: DictConfig) -> Path:
    """torchvision's ImageNet-1k weights of `cfg.name` in the torch hub cache (never downloaded)."""
    if cfg.name not in STEMMED:
        raise ClrunError(
            f"backbone.pretrained=imagenet: torchvision's ImageNet weights exist for {', '.join(STEMMED)}, "
            f"not backbone.name={cfg.name}"
        )
    if _stem(cfg) != "imagenet" or cfg.width != 1:
        raise ClrunError(
            f"backbone.pretrained=imagenet needs backbone.stem=imagenet and backbone.width=1 "
            f"(got stem={_stem(cfg)}, width={cfg.width})"
        )
    import torchvision.models  # imported here: slow to import, and only this needs it

    url = getattr(torchvision.models, STEMMED[cfg.name].weights).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.is_file():
        raise ClrunError(
            f"backbone.pretrained=imagenet: {path.name} is missing: put torchvision's file ({url}) into "
            f"{path.parent}/ (TORCH_HOME moves it; nothing is downloaded), or set backbone.pretrained=<path>"
        )
    return path


def _load_pretrained(model: nn.Module, cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Load `cfg.pretrained` (a state dict file, or `imagenet`) into `model` strictly, apart from the classifier
    (`fc.*`; VGG16-BN: `classifier.6.*`); return the classifier's tensors by their names within it."""
    if cfg.pretrained == "imagenet":
        path = _imagenet_file(cfg)
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ClrunError(f"backbone.pretrained: file not found: {cfg.pretrained}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = _head_prefix(cfg.name)
    head = {k.removeprefix(prefix): state.pop(k) for k in list(state) if k.startswith(prefix)}
    own = model.state_dict()
    bad = sorted(own.keys() ^ state.keys()) + sorted(
        k for k in own.keys() & state.keys() if own[k].shape != state[k].shape
    )
    if bad:
        stem = f" (stem={_stem(cfg)})" if cfg.name in STEMMED else ""
        raise ClrunError(
            f"backbone.pretrained: {cfg.pretrained} does not fit backbone.name={cfg.name}{stem} at width {cfg.width}: "
            f"{len(bad)} keys missing, unexpected or of another shape, e.g. {bad[0]}"
        )
    model.load_state_dict(state, strict=True)
    return head


def _attach_imagenet_head(model: nn.Module, cfg: DictConfig, head: dict[str, torch.Tensor]) -> None:
    """Keep the pretrained classifier on `model` as `imagenet_head` (weight, bias): task 0's head starts from it."""
    if cfg.pretrained is None:
        raise ClrunError("backbone.imagenet_head=true needs backbone.pretrained (imagenet or a state dict file)")
    weight, bias = head.get("weight"), head.get("bias")
    if weight is None or bias is None or weight.shape[1:] != (model.out_features,):
        raise ClrunError(
            f"backbone.imagenet_head=true: {cfg.pretrained} holds no classifier on the {model.out_features} features "
            f"of backbone.name={cfg.name} (keys {_head_prefix(cfg.name)}weight and bias)"
        )
    model.imagenet_head = (weight, bias)


def build_backbone(cfg: DictConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Build the backbone `cfg.name` for (C, H, W) inputs, initialised by the rule `cfg.init` (kept as the
    attribute `init`, for its heads), loading `cfg.pretrained` if set; with `cfg.imagenet_head`, the pretrained
    classifier is kept as the attribute `imagenet_head` (weight, bias).

    Raises `ClrunError` for an unknown name, a stem it has no choice of, an input shape the backbone cannot
    take, or a missing or non-matching pretrained file.
    """
    if cfg.name not in BACKBONES:
        raise ClrunError(f"backbone.name: unknown backbone '{cfg.name}' (valid: {', '.join(BACKBONES)})")
    if cfg.get("stem") is not None and cfg.name not in STEMMED:
        raise ClrunError(f"backbone.stem: only {', '.join(STEMMED)} have a choice of stem; set it null for {cfg.name}")
    shape = tuple(int(s) for s in input_shape)
    model = BACKBONES[cfg.name](cfg, shape)
    model.init = _choice(cfg, "init", "torch")  # the heads' rule too
    if model.init == "cpg":
        init_as_cpg(model)
    head = {} if cfg.pretrained is None else _load_pretrained(model, cfg)
    if cfg.get("imagenet_head"):
        _attach_imagenet_head(model, cfg, head)
    return model
