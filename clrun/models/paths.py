"""Modular networks: layers of modules, a path picks which ones run (PathNet's `ModularNet`, RPS-Net's
`MaskedModularNet`).

PathNet's path is an (L, N) tensor of module indices: row l names the N modules of
layer l whose outputs (Linear + ReLU) are summed and fed to the next layer; a
repeated index counts once per occurrence (as kimhc6028/pathnet-pytorch sums them).
Each task has its own linear readout on the last layer's sum. RPS-Net's path is an
(L, M) boolean mask (see `MaskedModularNet`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from clrun.models.layers import Linear


class ModularNet(nn.Module):
    """`layers` layers of `modules` modules of `units` ReLU units each, per-task heads, and which modules are
    frozen (`frozen`, (L, M) booleans: modules on an earlier task's path, never trained again)."""

    def __init__(self, n_inputs: int, layers: int, modules: int, units: int):
        super().__init__()
        sizes = [n_inputs] + [units] * layers
        self.layers = nn.ModuleList(
            nn.ModuleList(Linear(sizes[i], units) for _ in range(modules)) for i in range(layers)
        )
        self.heads = nn.ModuleList()
        self.register_buffer("frozen", torch.zeros(layers, modules, dtype=torch.bool))

    def forward(self, x: torch.Tensor, path: torch.Tensor, head: int) -> torch.Tensor:
        h = x.flatten(1)
        for layer, active in zip(self.layers, path.tolist(), strict=True):
            h = sum(F.relu(layer[m](h)) for m in active)
        return self.heads[head](h)

    def trainable(self, path: torch.Tensor) -> list[nn.Parameter]:
        """Parameters of the path's modules that are not frozen, each once."""
        picked = {(i, m) for i, active in enumerate(path.tolist()) for m in active if not self.frozen[i, m]}
        return [p for i, m in sorted(picked) for p in self.layers[i][m].parameters()]

    def freeze(self, path: torch.Tensor) -> None:
        """Freeze the path's modules, then reinitialise every module still unfrozen (Fernando et al.)."""
        for i, active in enumerate(path.tolist()):
            self.frozen[i, active] = True
        for i, layer in enumerate(self.layers):
            for m, module in enumerate(layer):
                if not self.frozen[i, m]:
                    module.reset_parameters()


class MaskedModularNet(nn.Module):
    """RPS-Net's modular MLP (Rajasegaran et al. 2019, brjathu/RPSnet `RPS_net_mlp`): layer l holds `modules`
    Linear modules of `widths[l]` units; a path is an (L, M) boolean mask and a layer's output is the ReLU of the
    sum of its masked modules' outputs (summed before the ReLU, unlike `ModularNet`); one linear head over
    `n_classes` reads the last layer."""

    def __init__(self, n_inputs: int, widths: list[int], modules: int, n_classes: int):
        super().__init__()
        sizes = [n_inputs, *widths]
        self.layers = nn.ModuleList(
            nn.ModuleList(Linear(sizes[i], sizes[i + 1]) for _ in range(modules)) for i in range(len(widths))
        )
        self.head = Linear(widths[-1], n_classes)

    def features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer, row in zip(self.layers, mask.tolist(), strict=True):
            h = F.relu(sum(module(h) for module, on in zip(layer, row, strict=True) if on))
        return h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, mask))

    def picked(self, mask: torch.Tensor) -> list[nn.Module]:
        """The modules `mask` selects, layer by layer."""
        return [
            module
            for layer, row in zip(self.layers, mask.tolist(), strict=True)
            for module, on in zip(layer, row, strict=True)
            if on
        ]
