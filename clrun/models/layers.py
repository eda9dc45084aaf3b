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


HEAD_STD = 0.01  # `init_as_cpg`'s std of linear layers, heads included


def init_as_cpg(module: nn.Module) -> None:
    """CPG's and PackNet's initialisation (torchvision's VGG): every convolution Kaiming-normal (fan_out, ReLU),
    every linear layer N(0, HEAD_STD), biases 0, batch norm weight 1 and bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, HEAD_STD)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
            nn.init.ones_(layer.weight)
        else:
            continue
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)


class BatchNorm2d(nn.BatchNorm2d):
    """A `torch.nn.BatchNorm2d` that clrun's methods can find (per-task statistics)."""


class BatchNorm1d(nn.BatchNorm1d):
    """A `torch.nn.BatchNorm1d` that clrun's methods can find (per-task statistics)."""
