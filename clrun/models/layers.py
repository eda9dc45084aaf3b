"""clrun's own layer types.

Every backbone and head builds its convolutions, linear layers and batch norms
from these classes only. Methods that change layers in place (PackNet / CPG
weight masks, network growth, per-task batch norm) find the layers to extend
by these types, so a layer built from plain `torch.nn` would silently escape
them. For now they behave exactly like their `torch.nn` bases.
"""

from torch import nn


class Conv2d(nn.Conv2d):
    """A `torch.nn.Conv2d` that clrun's methods can find and extend."""


class Linear(nn.Linear):
    """A `torch.nn.Linear` that clrun's methods can find and extend."""


class BatchNorm2d(nn.BatchNorm2d):
    """A `torch.nn.BatchNorm2d` that clrun's methods can find and extend."""


class BatchNorm1d(nn.BatchNorm1d):
    """A `torch.nn.BatchNorm1d` that clrun's methods can find and extend."""
