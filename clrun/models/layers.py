"""clrun's own layer types.

Every backbone and head builds its convolutions, linear layers and batch norms
from these classes only. Methods that change layers in place find them by
these types: weight-sharing methods (PackNet, Piggyback, PAE, CPG) set a
layer's `weight_fn`, which computes the weight the forward pass uses (for
example the weight times a task's mask); growth and per-task batch norm copy
their tensors. Without a `weight_fn` they behave exactly like `torch.nn`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _WeightFn:
    weight_fn: Callable[[nn.Module], torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: `weight_fn(self)` when set, else `weight`."""
        return self.weight if self.weight_fn is None else self.weight_fn(self)


class Conv2d(_WeightFn, nn.Conv2d):
    """A `torch.nn.Conv2d` whose forward weight a method can replace through `weight_fn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class Linear(_WeightFn, nn.Linear):
    """A `torch.nn.Linear` whose forward weight a method can replace through `weight_fn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class BatchNorm2d(nn.BatchNorm2d):
    """A `torch.nn.BatchNorm2d` that clrun's methods can find (per-task statistics)."""


class BatchNorm1d(nn.BatchNorm1d):
    """A `torch.nn.BatchNorm1d` that clrun's methods can find (per-task statistics)."""
