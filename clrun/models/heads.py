"""Task heads: one linear classifier per task on top of a shared backbone."""

import torch
from torch import nn

from clrun.errors import ClrunError
from clrun.models.faces import FaceHead
from clrun.models.layers import Linear, init_as_cpg


def start_from_classifier(head: nn.Linear, classifier: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Copy a pretrained classifier's (weight, bias) into task 0's `head` (`backbone.imagenet_head`)."""
    weight, bias = classifier
    if head.out_features != len(weight):
        raise ClrunError(
            f"backbone.imagenet_head=true makes task 0's head the pretrained classifier of {len(weight)} classes, "
            f"but task 0 has {head.out_features}; set backbone.imagenet_head=false"
        )
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


class MultiHead(nn.Module):
    """One head per task, initialised by the rule `init` (`backbone.init`: `torch` or `cpg`): linear, or for a
    verification task a `FaceHead` (embedding layer + A-Softmax, CPG's; its own initialisation); `forward` routes
    features to the task's head."""

    def __init__(self, init: str = "torch") -> None:
        super().__init__()
        self.heads = nn.ModuleList()
        self.init = init

    def add(self, in_features: int, n_classes: int, verification: bool = False) -> int:
        """Append a head for a new task (`verification`: a `FaceHead`) and return its task index."""
        if verification:
            head = FaceHead(in_features, n_classes)
        else:
            head = Linear(in_features, n_classes)
            if self.init == "cpg":
                init_as_cpg(head)
        self.heads.append(head)
        return len(self.heads) - 1

    def layout(self) -> list[tuple[int, int, bool]]:
        """(in_features, n_classes, verification) of each head: what `add` rebuilds them from."""
        return [
            (h.embedding.in_features, h.out_features, True)
            if isinstance(h, FaceHead)
            else (h.in_features, h.out_features, False)
            for h in self.heads
        ]

    def forward(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task `task`'s head, (N, n_classes of that task)."""
        return self.heads[task](features)

    def embed(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """What a verification task compares: its `FaceHead`'s embedding; the features themselves for a linear
        head."""
        head = self.heads[task]
        return head.embed(features) if isinstance(head, FaceHead) else features


class TaskModel(nn.Module):
    """A backbone (exposing `out_features`) followed by output heads laid out for a scenario.

    `task`: one head per task. `class`: one head per task too, concatenated into
    the one head over every class seen so far (a linear layer that grows).
    `domain`: one head shared by every task.
    """

    def __init__(self, backbone: nn.Module, scenario: str = "task") -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = MultiHead(getattr(backbone, "init", "torch"))  # `build_backbone`'s rule
        self.scenario = scenario

    def add_head(self, n_classes: int, verification: bool = False) -> int:
        """Add the output units of a new task (`verification`: a `FaceHead`), on the backbone's device; return the
        task's head index (domain: the shared head, created on the first call only). Task 0's head starts from the
        backbone's `imagenet_head` when it has one (`build_backbone` with `backbone.imagenet_head`)."""
        if self.scenario == "domain" and len(self.heads.heads):
            return 0
        task = self.heads.add(self.backbone.out_features, n_classes, verification)
        self.heads.heads[task].to(next(self.backbone.parameters()).device)
        classifier = getattr(self.backbone, "imagenet_head", None)
        if task == 0 and classifier is not None and not verification:
            start_from_classifier(self.heads.heads[task], classifier)
        return task

    def trainable(self, task: int) -> list[nn.Parameter]:
        """What learning task `task` trains: the backbone and the task's own head in the task scenario
        (earlier heads stay untouched by weight decay and momentum), everything otherwise."""
        if self.scenario == "task":
            return list(self.backbone.parameters()) + list(self.heads.heads[task].parameters())
        return list(self.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (N, out_features)."""
        return self.backbone(x)

    def logits(self, features: torch.Tensor, task: int | None) -> torch.Tensor:
        """Logits from backbone features: of task `task`'s classes when it is given (domain: the shared
        head), else the scenario's task-agnostic output (class: every head concatenated; domain: shared)."""
        if self.scenario == "domain":
            return self.heads(features, 0)
        if task is not None:
            return self.heads(features, task)
        if self.scenario == "task":
            raise ValueError("the task scenario has no task-agnostic output: give a task")
        return torch.cat([head(features) for head in self.heads.heads], dim=1)

    def forward(self, x: torch.Tensor, task: int | None) -> torch.Tensor:
        """`logits` of inputs `x`."""
        return self.logits(self.backbone(x), task)
