"""Per-unit gates on a backbone's hidden layers (HAT, XdG).

A gate is one value per unit of a hidden linear layer or per channel of a hidden
convolution, multiplied into the output of the layer's activation (after the
nonlinearity, as HAT and XdG gate). `Gates` applies them through forward hooks on
the activation modules, so the backbone's code and its state_dict stay as they are.

Only chain backbones are supported: `mlp`, `convnet` and `vgg16_bn`, where every
clrun Conv2d/Linear is followed by its own activation (batch norm and pooling may
sit in between; both act per channel, so a gate commutes with pooling) and feeds
the next weight layer only. Residual backbones (resnet18, resnet50, sphereface20)
are refused: a skip connection adds ungated units to gated ones, so gates would
have to act on block outputs and the shortcut's weights be masked with them.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from clrun.errors import ClrunError
from clrun.models.backbones import MLP, VGG16BN, ConvNet
from clrun.models.layers import Conv2d, Linear

CHAIN_BACKBONES = {MLP: "mlp", ConvNet: "convnet", VGG16BN: "vgg16_bn"}


@dataclass
class GatedLayer:
    """A hidden weight layer and where its gates sit."""

    name: str  # the weight layer's name in the backbone
    layer: nn.Module  # its clrun Conv2d / Linear
    activation: nn.Module  # the activation whose output the gate multiplies
    units: int  # gates: output channels or features
    input_gate: int | None  # index of the layer whose gates act on this layer's input (None: the raw input)
    input_repeat: int  # input features per gated input unit (H*W for a Linear after a conv's flatten, else 1)


def gated_layers(backbone: nn.Module, method: str) -> list[GatedLayer]:
    """The hidden layers of a chain backbone in forward order, each paired with its activation; raises
    `ClrunError` for other backbones (`method` names the method asking, for the message)."""
    if type(backbone) not in CHAIN_BACKBONES:
        supported = ", ".join(CHAIN_BACKBONES.values())
        raise ClrunError(
            f"method {method} gates the hidden units of chain backbones only ({supported}); "
            f"{type(backbone).__name__} has skip connections, whose outputs a per-unit gate cannot isolate"
        )
    layers: list[GatedLayer] = []
    pending: tuple[str, nn.Module] | None = None
    for name, module in backbone.named_modules():
        if isinstance(module, (Conv2d, Linear)):
            if pending is not None:
                raise ClrunError(f"method {method}: backbone layer {pending[0]} has no activation to gate")
            pending = (name, module)
        elif isinstance(module, nn.ReLU) and pending is not None:
            layer_name, layer = pending
            units = layer.out_channels if isinstance(layer, Conv2d) else layer.out_features
            inputs = layer.in_channels if isinstance(layer, Conv2d) else layer.in_features
            previous = len(layers) - 1 if layers else None
            repeat = 1 if previous is None else inputs // layers[previous].units
            if previous is not None and repeat * layers[previous].units != inputs:
                raise ClrunError(f"method {method}: backbone layer {layer_name}'s inputs do not match the gated units")
            layers.append(GatedLayer(layer_name, layer, module, units, previous, repeat))
            pending = None
    if pending is not None or not layers:
        raise ClrunError(f"method {method}: the backbone has no hidden layer to gate (e.g. mlp with hidden=[])")
    return layers


def batch_norm_state(module: nn.Module, statistics_only: bool = False) -> dict[str, torch.Tensor]:
    """Copies of the batch-norm tensors in `module` by name: affine parameters and running statistics, or the
    statistics only. Gating changes what a batch norm sees, so gated methods keep these per task."""
    state = {}
    for prefix, norm in module.named_modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            for key, value in norm.state_dict().items():
                if not statistics_only or key in ("running_mean", "running_var", "num_batches_tracked"):
                    state[f"{prefix}.{key}"] = value.detach().clone()
    return state


class Gates:
    """Multiplies each given layer's activation output by `values[i]` (a tensor of `units` gates, on the
    backbone's device) while `values` is set; `values` None leaves the backbone ungated."""

    def __init__(self, layers: list[GatedLayer]) -> None:
        self.values: list[torch.Tensor] | None = None
        self.handles = [
            gated.activation.register_forward_hook(lambda module, inputs, output, i=i: self._gate(i, output))
            for i, gated in enumerate(layers)
        ]

    def _gate(self, index: int, output: torch.Tensor) -> torch.Tensor | None:
        if self.values is None:
            return None
        gate = self.values[index].to(output.dtype)
        return output * gate.view(1, -1, *([1] * (output.dim() - 2)))

    @contextlib.contextmanager
    def use(self, values: list[torch.Tensor]):
        """Gate with `values` inside the block."""
        self.values = values
        try:
            yield
        finally:
            self.values = None

    def remove(self) -> None:
        """Take the hooks off the backbone."""
        for handle in self.handles:
            handle.remove()
