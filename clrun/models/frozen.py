"""A network around a base backbone that is frozen once learned (Side-Tuning's base, DAN's task-0 network)."""

import torch
from torch import nn


class FrozenBaseNet(nn.Module):
    """Holds `base`; once `base_frozen`, the base runs without gradient and stays in eval mode (batch norm on its
    running statistics, never updated) whatever mode the rest of the network is in."""

    def __init__(self, base: nn.Module, frozen: bool = False):
        super().__init__()
        self.base = base
        self.base_frozen = frozen

    def base_features(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output, with a gradient only while the base is not frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.base_frozen):
            return self.base(x)

    def train(self, mode: bool = True) -> "FrozenBaseNet":
        super().train(mode)
        if self.base_frozen:
            self.base.eval()
        return self
