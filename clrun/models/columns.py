"""Progressive-network columns (Rusu et al. 2016): a backbone cut into stages, with lateral adapters.

A stage is one weight layer (convolution or linear) followed by what comes
before the next weight layer (batch norm, ReLU, pooling, flatten). Column k
adds to each weight layer's output, from its second stage on, a lateral
U act(V [a_j h_j]_j) of the inputs h_j that earlier columns j < k fed to the
same stage; its head is one more stage, with a linear lateral.

Only plain feed-forward backbones cut into stages: mlp, convnet, vgg16_bn.
ResNets and SphereFace have skip connections, so a lateral has no single
place per layer to go.
"""

import torch
import torch.nn.functional as F
from torch import nn

from clrun.errors import ClrunError
from clrun.models.backbones import MLP, VGG16BN, ConvNet
from clrun.models.layers import Conv2d, Linear

Stage = tuple[nn.Module, nn.Sequential]  # (weight layer, what follows it up to the next weight layer)


def layer_sequence(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The backbone's modules in forward order; `ClrunError` for backbone `name` if it is not a plain sequence."""
    if isinstance(backbone, (MLP, ConvNet)):
        return list(backbone.layers)
    if isinstance(backbone, VGG16BN):
        return [*backbone.features, *backbone.classifier]
    raise ClrunError(
        f"backbone.name={name} has skip connections, which progressive columns cannot tap layer by layer; "
        "use mlp, convnet or vgg16_bn"
    )


def cut_stages(modules: list[nn.Module]) -> tuple[nn.Sequential, list[Stage]]:
    """Split a forward sequence into the modules before the first weight layer and the stages."""
    starts = [i for i, m in enumerate(modules) if isinstance(m, (nn.Conv2d, nn.Linear))]
    ends = starts[1:] + [len(modules)]
    prefix = nn.Sequential(*modules[: starts[0]]) if starts else nn.Sequential(*modules)
    return prefix, [(modules[s], nn.Sequential(*modules[s + 1 : e])) for s, e in zip(starts, ends, strict=True)]


class Lateral(nn.Module):
    """U act(V [a_1 h_1, ..., a_m h_m]): the adapter from m earlier columns' inputs to a weight layer into that
    layer's output. V reduces the concatenation to one column's input width (Rusu et al.; joansj/hat's
    PNN), 1x1 convolutions for a convolution (U with the layer's stride, so shapes match for same-padded
    kernels; joansj/hat gives U the layer's own kernel), linear layers for a linear one; act is ReLU, or
    nothing for the output layer (`nonlinear` False, as joansj/hat's last-layer lateral). The scales a_j
    start small and random: U(0, 0.1) (Rusu et al.: "a random small value"; mammoth's AlphaModule)."""

    def __init__(self, layer: nn.Module, earlier: int, nonlinear: bool = True):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(earlier) * 0.1)
        self.nonlinear = nonlinear
        bias = layer.bias is not None
        if isinstance(layer, nn.Conv2d):
            n = layer.in_channels
            self.v = Conv2d(n * earlier, n, 1)
            self.u = Conv2d(n, layer.out_channels, 1, stride=layer.stride, bias=bias)
        else:
            n = layer.in_features
            self.v = Linear(n * earlier, n)
            self.u = Linear(n, layer.out_features, bias=bias)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        hidden = self.v(torch.cat([a * h for a, h in zip(self.alpha, inputs, strict=True)], dim=1))
        return self.u(F.relu(hidden) if self.nonlinear else hidden)


class Column(nn.Module):
    """One task's column: a backbone, its head, and laterals from `earlier` columns into every stage but the
    first (whose input, the image, every column shares)."""

    def __init__(self, backbone: nn.Module, name: str, n_classes: int, earlier: int):
        super().__init__()
        self.backbone = backbone
        self.head = Linear(backbone.out_features, n_classes)
        prefix, stages = cut_stages(layer_sequence(backbone, name))
        stages.append((self.head, nn.Sequential()))
        self._views = (prefix, stages)  # a tuple: views of modules registered above, not registered again
        self.laterals = nn.ModuleList(
            Lateral(layer, earlier, nonlinear=layer is not self.head) for layer, _ in stages[1:] if earlier
        )

    def forward(self, x: torch.Tensor, earlier: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of `x` and this column's input to each stage, given each earlier column's stage inputs."""
        prefix, stages = self._views
        h, inputs = prefix(x), []
        for i, (layer, rest) in enumerate(stages):
            inputs.append(h)
            out = layer(h)
            if i > 0 and earlier:
                out = out + self.laterals[i - 1]([column[i] for column in earlier])
            h = rest(out)
        return h, inputs


class ProgressiveNet(nn.Module):
    """Columns in task order. Task k runs columns 0..k-1 without gradient, then column k with their laterals.
    Only the last column ever trains: `train()` keeps every earlier one in eval mode (batch norm on its
    running statistics, never updated, so earlier columns' outputs never change, as Rusu et al.'s frozen columns)."""

    def __init__(self):
        super().__init__()
        self.columns = nn.ModuleList()

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        earlier = []
        for column in self.columns[:task]:
            with torch.no_grad():
                earlier.append(column(x, earlier)[1])
        return self.columns[task](x, earlier)[0]

    def train(self, mode: bool = True) -> "ProgressiveNet":
        super().train(mode)
        for column in self.columns[:-1]:
            column.eval()
        return self
