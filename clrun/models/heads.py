"""Task heads: one linear classifier per task on top of a shared backbone."""

import torch
from torch import nn

from clrun.models.layers import Linear


class MultiHead(nn.Module):
    """One linear head per task; `forward` routes features to the task's head."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList()

    def add(self, in_features: int, n_classes: int) -> int:
        """Append a head for a new task and return its task index."""
        self.heads.append(Linear(in_features, n_classes))
        return len(self.heads) - 1

    def forward(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task `task`'s head, (N, n_classes of that task)."""
        return self.heads[task](features)


class TaskModel(nn.Module):
    """A backbone (exposing `out_features`) followed by per-task heads."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = MultiHead()

    def add_head(self, n_classes: int) -> int:
        """Add a head for a new task, on the backbone's device; return its task index."""
        task = self.heads.add(self.backbone.out_features, n_classes)
        self.heads.heads[task].to(next(self.backbone.parameters()).device)
        return task

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (N, out_features)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task `task` for inputs `x`."""
        return self.heads(self.backbone(x), task)
