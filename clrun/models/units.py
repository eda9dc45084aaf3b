"""A unit pool: a ReLU MLP whose hidden units are handed out to tasks (RCL's growing network, CLEAS's pool).

Each hidden layer is one Linear over the layer's whole capacity, and `owners[l]` records which task added each
unit (FREE: none yet). A task runs through its unit masks (the units it uses, per layer) and its own head; a unit
outside the mask outputs exactly 0, so nothing that flows only through it reaches the task's logits.
"""

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from clrun.models.layers import Linear

FREE = -1  # a unit's owner before a task adds it


class UnitNet(nn.Module):
    """Hidden layers of `capacities` units on `n_inputs` flattened inputs, and one head per task."""

    def __init__(self, n_inputs: int, capacities: list[int]):
        super().__init__()
        sizes = [n_inputs, *capacities]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in pairwise(sizes))
        for i, units in enumerate(capacities):
            self.register_buffer(f"owner{i}", torch.full((units,), FREE, dtype=torch.long))
        self.heads = nn.ModuleList()

    @property
    def owners(self) -> list[torch.Tensor]:
        return [getattr(self, f"owner{i}") for i in range(len(self.layers))]

    def add_head(self, n_classes: int) -> int:
        """A new head on the last hidden layer; returns its index."""
        weight = self.layers[-1].weight
        self.heads.append(Linear(weight.shape[0], n_classes).to(weight.device))
        return len(self.heads) - 1

    def forward(self, x: torch.Tensor, head: int, masks: list[torch.Tensor]) -> torch.Tensor:
        h = x.flatten(1)
        for layer, mask in zip(self.layers, masks, strict=True):
            h = F.relu(layer(h)) * mask
        return self.heads[head](h)
