"""The base of RCL and CLEAS: per task, candidate unit allocations of a `UnitNet` trained and the best kept.

Task 0 trains the units of `backbone=mlp`'s hidden layers directly. Every later task holds out `validation` of
its training images, and its subclass's `search` proposes `episodes` candidates (which free units become the
task's new units, and which units the task uses); each candidate is a copy of the stored network with a fresh
head, trained through `Method.fit` on the rest of the images with every entry but its movable ones put back after
each step, and scored reward = validation accuracy - `penalty` x cost. The candidate with the highest reward (the
first, on ties) becomes the stored network. Units then belong to the task that added them and never move again;
the weights into them from units the task did not use are zeroed, so a unit computes the same function wherever
it is reused with the same inputs. Task t predicts through its masks, which exclude every later unit, so earlier
tasks' logits stay bit-identical.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F

from clrun.config import AT_LEAST_1, NON_NEGATIVE, Rule, checked
from clrun.data.stream import Split, Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.methods.parts.controller import ControllerConfig
from clrun.models import build_backbone
from clrun.models.layers import Linear
from clrun.models.units import FREE, UnitNet
from clrun.results import Footprint, tensor_bytes
from clrun.train import FitStats, TrainConfig, accuracy

Masks = list[torch.Tensor]  # per hidden layer, a bool per unit of its capacity


@dataclass
class UnitSearchConfig(PerTaskMethodConfig):
    """What RCL and CLEAS share; `train` is the recipe of task 0 and of every candidate."""

    episodes: int = checked(AT_LEAST_1, 5)  # candidates (controller episodes) per task after the first
    penalty: float = checked(NON_NEGATIVE, 1e-4)  # reward = validation accuracy - penalty x cost
    validation: float = checked(Rule(lambda v: 0 < v < 1, "in (0, 1)"), 0.1)  # training images held out
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Candidate:
    reward: float
    accuracy: float
    net: UnitNet
    new: Masks
    masks: Masks


Score = Callable[[Masks, Masks, float, str], float]  # score(new, masks, cost, phase) -> reward


class UnitSearchMethod(Method):
    """Subclasses set `cross` (whether a task also trains the weights from its new units into older units of the
    next layer), and implement `capacities(base)` and `search(task, score)`."""

    cross = False

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if backbone_cfg.name != "mlp":
            raise ClrunError(
                f"{cfg.name} grows fully connected layers only: use backbone=mlp (its hidden sizes are task 0's "
                f"units), not {backbone_cfg.name}"
            )
        mlp = build_backbone(backbone_cfg, stream.input_shape)
        self.base = [m.out_features for m in mlp.modules() if isinstance(m, Linear)]  # task 0's units per layer
        self.n_inputs = math.prod(stream.input_shape)
        self.net = self.new_net()
        self.masks: list[Masks] = []  # per learned task

    def capacities(self, base: list[int]) -> list[int]:
        raise NotImplementedError

    def search(self, task: Task, score: Score) -> None:
        """Propose and `score` candidates for `task`."""
        raise NotImplementedError

    def new_net(self) -> UnitNet:
        return self.hw.prepare_model(UnitNet(self.n_inputs, self.capacities(self.base)))

    def free_units(self, layer: int, count: int) -> torch.Tensor:
        """The first `count` free units of `layer` (indices, fewer if fewer are free)."""
        return (self.net.owners[layer] == FREE).nonzero()[:count, 0]

    def as_mask(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(self.net.owners[layer], dtype=torch.bool)
        mask[units] = True
        return mask

    # ---- learning --------------------------------------------------------------------
    def learn(self, task: Task) -> dict:
        if task.index == 0:
            new = [self.as_mask(i, torch.arange(n)) for i, n in enumerate(self.base)]
            net, stats = self.train_candidate(task, new, new, (task.train.x, task.train.y), "", task.test)
            self.keep(task, new, new, net)
            return {**stats.row(), "added_units": sum(self.base), "used_units": sum(self.base)}
        x, y = task.train.x, task.train.y
        order = torch.randperm(len(y))
        held = max(1, round(self.cfg.validation * len(y)))
        held_out, rest = order[:held], order[held:]
        validation = Split(x[held_out.to(x.device)], y[held_out.to(y.device)])
        data = (x[rest.to(x.device)], y[rest.to(y.device)])
        phases: list[FitStats] = []
        best: list[Candidate] = []

        def score(new: Masks, masks: Masks, cost: float, phase: str) -> float:
            net, stats = self.train_candidate(task, new, masks, data, phase, validation)
            phases.append(stats)
            correct = self.candidate_accuracy(net, task, masks, validation)
            reward = correct - self.cfg.penalty * cost
            if not best or reward > best[0].reward:
                best[:] = [Candidate(reward, correct, net, new, masks)]
            return reward

        self.search(task, score)
        chosen = best[0]
        self.keep(task, chosen.new, chosen.masks, chosen.net)
        return {
            **FitStats.total(phases).row(),
            "episodes": len(phases),
            "reward": chosen.reward,
            "val_accuracy": chosen.accuracy,
            "added_units": int(sum(n.sum() for n in chosen.new)),
            "used_units": int(sum(m.sum() for m in chosen.masks)),
        }

    def movable(self, net: UnitNet, new: Masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, entries a candidate trains) of every hidden layer: the weights and biases of the new units and,
        with `cross`, the weights from the previous layer's new units into the layer's older units."""
        pairs = []
        for i, layer in enumerate(net.layers):
            rows = new[i][:, None].expand_as(layer.weight)
            if self.cross and i:
                older = (net.owners[i] != FREE)[:, None] & new[i - 1][None]
                rows = rows | older
            pairs += [(layer.weight, rows), (layer.bias, new[i])]
        return pairs

    def candidate_accuracy(self, net: UnitNet, task: Task, masks: Masks, split: Split) -> float:
        net.eval()
        predict = lambda x: net(x, task.index, masks)  # noqa: E731
        return accuracy(predict, split, self.stream, self.hw, self.cfg.eval_batch_size, task.index)

    def train_candidate(
        self, task: Task, new: Masks, masks: Masks, data, phase: str, check: Split
    ) -> tuple[UnitNet, FitStats]:
        """A copy of the stored network with a new head for `task`, trained on `data` through `masks`, only the
        `movable` entries and the head changing; a `plateau` schedule follows its accuracy on `check` (the
        validation split; task 0: the test split, as `Method.fit` validates)."""
        net = copy.deepcopy(self.net)
        head = net.add_head(task.n_classes)
        kept = [(t, ~m, t.detach().clone()) for t, m in self.movable(net, new)]

        def restore(step) -> None:
            with torch.no_grad():
                for tensor, frozen, value in kept:
                    tensor.copy_(torch.where(frozen, value, tensor))

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            return F.cross_entropy(net(x, head, masks), y)

        params = [*net.layers.parameters(), *net.heads[head].parameters()]
        validate = None
        if self.cfg.train.schedule.value == "plateau":
            validate = lambda: self.candidate_accuracy(net, task, masks, check)  # noqa: E731
        return net, self.fit(task, net, params, loss, phase=phase, data=data, after_step=restore, validate=validate)

    @torch.no_grad()
    def keep(self, task: Task, new: Masks, masks: Masks, net: UnitNet) -> None:
        """Make `net` the stored network: the new units become the task's, their weights from units the task does
        not use are zeroed."""
        for i, layer in enumerate(net.layers):
            net.owners[i][new[i]] = task.index
            if i:
                layer.weight[new[i][:, None] & ~masks[i - 1][None]] = 0
        self.net = net
        self.masks.append(masks)

    def added_params(self, new: Masks, masks: Masks) -> int:
        """Parameters a candidate adds: its new units' weights (from the inputs or the used units below) and
        biases, and with `cross` the weights from new units into the next layer's older units."""
        below, total = self.n_inputs, 0
        for i, (n, m) in enumerate(zip(new, masks, strict=True)):
            total += int(n.sum()) * (below + 1)
            if self.cross and i:
                total += int((m & ~n).sum()) * int(new[i - 1].sum())
            below = int(m.sum())
        return total

    # ---- prediction, accounting and persistence --------------------------------------
    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, task, self.masks[task])

    def footprint(self) -> Footprint:
        """Dense layers over the units some task added, each task's head on the units it uses, its masks."""
        sizes = [self.n_inputs, *(int((o != FREE).sum()) for o in self.net.owners)]
        body = sum(a * b + b for a, b in pairwise(sizes))
        heads = sum(
            int(m[-1].sum()) * h.out_features + h.out_features for m, h in zip(self.masks, self.net.heads, strict=True)
        )
        base_sizes = [self.n_inputs, *self.base]
        classes = self.stream.tasks[0].n_classes
        base = sum(a * b + b for a, b in pairwise(base_sizes)) + base_sizes[-1] * classes + classes
        size = (body + heads) * self.net.layers[0].weight.element_size()
        return Footprint(
            params=body + heads, bytes=size + tensor_bytes(m for ms in self.masks for m in ms), base_params=base
        )

    def summary(self) -> dict:
        return {"units": sum(int((o != FREE).sum()) for o in self.net.owners)}

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.new_net()
        for task in self.stream.tasks[: len(state["masks"])]:
            self.net.add_head(task.n_classes)
        self.net.load_state_dict(state["net"])
        self.masks = [[m.to(self.hw.device) for m in masks] for masks in state["masks"]]
