"""DAN, Deep Adaptation Networks (Rosenfeld & Tsotsos, TPAMI 2018, arXiv 1705.04228): controller modules.

Task 0 trains the base network, which is then frozen. Every later task gets,
per convolution and linear layer of the backbone, a controller: a learned
C_out x C_out matrix A that recombines the frozen base filters, so the task's
weight is A @ W_base (W_base flattened to C_out x C_in*k*k), started from the
identity (A = I gives the base layer exactly); the task also has its own
biases, batch norm (affine parameters and statistics) and head. Added
parameters per task: C_out^2 (+ C_out bias) per layer, plus batch norm and the
head. The base runs in eval mode without gradient once frozen, and each task's
controllers are never trained again, so every task's logits stay bit-identical.
With `quantize_bits` (the paper's quantisation), each controller is replaced
after its task by its uniform quantisation on 2^bits levels between its minimum
and maximum, and stored as those codes plus the two ends.

Task scenario (a task predicts with its own controllers); the class and domain
scenarios with `task_id`. Any backbone built from clrun's layers.
"""

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import Rule, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.frozen import FrozenBaseNet
from clrun.models.layers import Conv2d, Linear
from clrun.results import Footprint, count_params, module_bytes


def controlled_weight(frozen: nn.Module, layer: nn.Module) -> torch.Tensor:
    """`layer`'s weight: its controller times the frozen base layer's filters, flattened per output channel."""
    w = frozen.weight.detach()
    return (layer.control @ w.flatten(1)).view(w.shape)


def controlled_copy(base: nn.Module) -> nn.Module:
    """A copy of `base` whose convolutions and linear layers hold no weight of their own but a controller
    (identity at first) over the base's frozen filters; biases and batch norm are the copy's own."""
    net = copy.deepcopy(base)
    for frozen, layer in zip(base.modules(), net.modules(), strict=True):
        if isinstance(layer, (Conv2d, Linear)):
            del layer.weight
            layer.control = nn.Parameter(torch.eye(frozen.weight.shape[0], device=frozen.weight.device))
            layer.weight_fn = partial(controlled_weight, frozen)
    return net


@dataclass
class DANConfig(PerTaskMethodConfig):
    """DAN (Rosenfeld & Tsotsos 2018): a frozen base, per later task controllers recombining its filters."""

    # quantise each controller to this many bits after its task (8: the abstract's 13% -> 3% cost); null: float32
    quantize_bits: Optional[int] = checked(Rule(lambda v: 1 <= v <= 16, "null or in [1, 16]"), None)


def quantize_(control: torch.Tensor, bits: int) -> None:
    """Round `control` in place to the nearest of 2^bits evenly spaced values from its minimum to its maximum."""
    low, high = control.min(), control.max()
    step = (high - low) / (2**bits - 1)
    if step > 0:
        control.copy_(low + torch.round((control - low) / step) * step)


def controls(net: nn.Module) -> list[torch.Tensor]:
    """The controllers of a controlled copy, in layer order."""
    return [m.control for m in net.modules() if isinstance(m, (Conv2d, Linear))]


class DANNet(FrozenBaseNet):
    """The base network (task 0's), one controlled copy per later task and a head per task."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.controlled = nn.ModuleList()  # task k >= 1: controlled[k - 1]
        self.heads = nn.ModuleList()

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        if task == 0:
            return self.heads[0](self.base_features(x))
        return self.heads[task](self.controlled[task - 1](x))


class DAN(Method):
    config_class = DANConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.net = self.new_net()

    def new_net(self) -> DANNet:
        return self.hw.prepare_model(DANNet(build_backbone(self.backbone_cfg, self.stream.input_shape)))

    def add_task(self, task: Task) -> None:
        """A head for `task`, and its controlled copy of the base unless the base is learned on it."""
        net = self.net
        if task.index > 0:
            net.controlled.append(self.hw.prepare_model(controlled_copy(net.base)))
        net.heads.append(self.hw.prepare_model(Linear(net.base.out_features, task.n_classes)))

    def learn(self, task: Task) -> dict:
        self.add_task(task)
        net, k = self.net, task.index
        body = net.base if k == 0 else net.controlled[k - 1]
        params = [*body.parameters(), *net.heads[k].parameters()]
        stats = self.fit(task, net, params, lambda x, y, step: F.cross_entropy(net(x, k), y))
        net.base_frozen = True
        if k and self.cfg.quantize_bits is not None:
            with torch.no_grad():
                for control in controls(body):
                    quantize_(control, self.cfg.quantize_bits)
        return {**stats.row(), "added_params": count_params(body) + count_params(net.heads[k]) if k else 0}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, task)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "n_tasks": len(self.net.heads)}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.new_net()
        for task in self.stream.tasks[: state["n_tasks"]]:
            self.add_task(task)
        self.net.base_frozen = state["n_tasks"] > 0
        self.net.load_state_dict(state["net"])

    def footprint(self) -> Footprint:
        """The base and task 0's head, then per later task its controllers, biases, batch norm and head; a
        quantised controller as its codes (`quantize_bits` each) and its two 32-bit ends."""
        base = count_params(self.net.base) + count_params(self.net.heads[0])
        stored = module_bytes(self.net)
        if self.cfg.quantize_bits is not None:
            for control in (c for body in self.net.controlled for c in controls(body)):
                stored -= control.numel() * control.element_size()
                stored += math.ceil(control.numel() * self.cfg.quantize_bits / 8) + 8
        return Footprint(params=count_params(self.net), bytes=stored, base_params=base)
