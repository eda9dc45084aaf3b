"""Side-tuning (Zhang et al. 2020): a frozen base network plus a small side network and a head per task.

Task k's features blend the two: r = alpha_k base(x) + (1 - alpha_k) side_k(x),
with alpha_k = sigmoid(a_k), a_k learned from 0 (alpha 0.5; the code's
learned-alpha merge), or a fixed alpha (`fixed_alpha`). The side network is the
same backbone family at `side_width` times backbone.width, with a linear layer
onto the base's features when its width differs.

The base: with `backbone.pretrained` set, that pretrained backbone, frozen from
the start, and every task gets a side network (the paper's lifelong setting,
a base pretrained elsewhere). Without it, the base is task 0's model, trained
normally on task 0 (task 0 predicts with base and head alone) and frozen
afterwards; tasks from 1 on get side networks. The frozen base runs in eval
mode without gradient and earlier side networks and heads are never trained
again, so earlier tasks' logits never change. The paper
initialises side networks by distilling the base; here they start random.

Task scenario; the class and domain scenarios with `task_id`. Any backbone.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clrun.config import POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.frozen import FrozenBaseNet
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes


@dataclass
class SideTuningConfig(PerTaskMethodConfig):
    """Side-tuning (Zhang et al. 2020): a frozen base plus a side network and a head per task, blended by alpha."""

    # side network width as a multiple of backbone.width (the paper's side net is small)
    side_width: float = checked(POSITIVE, 0.25)
    # the base's weight in the blend; null: learned, sigmoid of a scalar from 0
    fixed_alpha: Optional[float] = checked(Rule(lambda v: 0 <= v <= 1, "null (learned) or in [0, 1]"), None)


class Side(nn.Module):
    """One task's side network, its projection onto the base's features and its blending weight."""

    def __init__(self, backbone: nn.Module, out_features: int, fixed_alpha: float | None):
        super().__init__()
        self.net = backbone
        same = backbone.out_features == out_features
        self.project = nn.Identity() if same else Linear(backbone.out_features, out_features)
        self.fixed_alpha = fixed_alpha
        self.logit = nn.Parameter(torch.zeros(())) if fixed_alpha is None else None  # sigmoid(0) = 0.5

    def alpha(self) -> torch.Tensor | float:
        """The base's weight in the blend."""
        return self.fixed_alpha if self.logit is None else torch.sigmoid(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.net(x))


class SideTuningNet(FrozenBaseNet):
    """The base, the side networks of tasks `first_side`, `first_side` + 1, ... and a head per task."""

    def __init__(self, base: nn.Module, first_side: int):
        super().__init__(base, frozen=first_side == 0)  # a pretrained base is frozen from the start; else after task 0
        self.sides = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.first_side = first_side

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        base = self.base_features(x)
        if task < self.first_side:
            return base
        side = self.sides[task - self.first_side]
        alpha = side.alpha()
        return alpha * base + (1 - alpha) * side(x)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(x, task))


class SideTuning(Method):
    config_class = SideTuningConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.net = self.new_net()

    def new_net(self) -> SideTuningNet:
        """The base (pretrained, or freshly initialised to be trained on task 0) with no tasks yet."""
        base = build_backbone(self.backbone_cfg, self.stream.input_shape)
        first_side = 0 if self.backbone_cfg.pretrained else 1
        return self.hw.prepare_model(SideTuningNet(base, first_side))

    def add_task(self, task: Task) -> None:
        """A head for `task`, and its side network unless the base is learned on it."""
        net = self.net
        if task.index >= net.first_side:
            cfg = OmegaConf.merge(
                self.backbone_cfg, {"width": self.backbone_cfg.width * self.cfg.side_width, "pretrained": None}
            )
            side = Side(build_backbone(cfg, self.stream.input_shape), net.base.out_features, self.cfg.fixed_alpha)
            net.sides.append(self.hw.prepare_model(side))
        net.heads.append(self.hw.prepare_model(Linear(net.base.out_features, task.n_classes)))

    def learn(self, task: Task) -> dict:
        self.add_task(task)
        net, k = self.net, task.index
        on_side = k >= net.first_side
        params = list(net.heads[k].parameters())
        params += list(net.sides[k - net.first_side].parameters()) if on_side else list(net.base.parameters())
        stats = self.fit(task, net, params, lambda x, y, step: F.cross_entropy(net(x, k), y))
        net.base_frozen = True
        with torch.no_grad():
            alpha = float(net.sides[k - net.first_side].alpha()) if on_side else 1.0
        return {**stats.row(), "alpha": alpha}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, task)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "n_tasks": len(self.net.heads)}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.new_net()
        for task in self.stream.tasks[: state["n_tasks"]]:
            self.add_task(task)
        self.net.base_frozen = self.net.base_frozen or state["n_tasks"] > 0
        self.net.load_state_dict(state["net"])

    def footprint(self) -> Footprint:
        """Base, every side network with its projection and alpha, every head; the base is the base with one head."""
        base = count_params(self.net.base) + count_params(self.net.heads[0])
        return Footprint(params=count_params(self.net), bytes=module_bytes(self.net), base_params=base)
