"""A backbone cut into blocks, and a path through a library of blocks (MNTDP's modular network).

MNTDP (Veniat et al. 2021) splits its ResNet-18 into stem, four stages and head
(TomVeniat/MNTDP `block_id` [0,1,1,2,2,3,3,4,4,5]). Here a ResNet is cut the
same way (stem, layer1..layer4 with the pooling, the head apart); a plain
backbone (`mlp`, `convnet`, `vgg16_bn`) into one block per weight layer and
what follows it up to the next (progressive columns' stages).
"""

import torch
from torch import nn

from clrun.errors import ClrunError
from clrun.models.backbones import MLP, VGG16BN, ConvNet, ResNet
from clrun.models.columns import cut_stages, layer_sequence


def cut_blocks(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The backbone as a list of blocks whose composition in order is its forward pass (`ClrunError` for a
    backbone it cannot cut, `sphereface20`)."""
    if not isinstance(backbone, (MLP, ConvNet, VGG16BN, ResNet)):
        raise ClrunError(
            f"backbone.name={name} cannot be cut into blocks; use mlp, convnet, vgg16_bn, resnet18 or resnet50"
        )
    if isinstance(backbone, ResNet):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        last = nn.Sequential(backbone.layer4, backbone.avgpool, nn.Flatten())
        return [stem, backbone.layer1, backbone.layer2, backbone.layer3, last]
    if isinstance(backbone, VGG16BN):  # its forward pools and flattens between features and classifier
        sequence = [*backbone.features, backbone.avgpool, nn.Flatten(), *backbone.classifier]
    else:
        sequence = layer_sequence(backbone, name)
    prefix, stages = cut_stages(sequence)
    blocks = [nn.Sequential(layer, *rest) for layer, rest in stages]
    blocks[0] = nn.Sequential(*prefix, *blocks[0])
    return blocks


class Path(nn.Module):
    """Blocks in order, then a head; the first `frozen` blocks are earlier tasks' (kept in eval mode, run without
    gradient), the rest train. A view: the blocks belong to the method's library."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module, frozen: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.frozen = frozen

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for block in self.blocks[: self.frozen]:
                x = block(x)
        for block in self.blocks[self.frozen :]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "Path":
        super().train(mode)
        for block in self.blocks[: self.frozen]:
            block.eval()
        return self
