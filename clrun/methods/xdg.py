"""XdG: context-dependent gating (Masse, Grant & Freedman, PNAS 2018), as van de Ven et al. run it.

Each task gets a fixed random binary gate on every hidden layer that silences
round(gating x units) of its units (or conv channels; `gate_conv: false` gates the
hidden linear layers only, as van de Ven's CIFAR runs), after the nonlinearity, the
same at training and test (`clrun.models.gating`). The output heads are not gated.
Nothing in the gates is learned. The gates of all tasks are drawn up front from a
generator seeded with `mask_seed` (null: torch's initial seed, which clrun sets to the
run's seed), and kept in the checkpoint.

Underneath is one shared model trained as `finetune`, or with `regularizer: ewc` / `si`
with EWC's or SI's penalty (`clrun.methods.parts.importance`: offline EWC without replay;
SI as van de Ven runs it), every pass gated by the current task's gate (the Fisher and the
path integral too). Units that tasks share still drift, so XdG does not claim zero
forgetting. Task scenario; class and domain with `task_id` (each task's gate gives its
own output).

Batch norm (convnet, vgg16_bn): the affine parameters are shared (and regularised) like
every weight, but each task predicts with the running statistics measured under its own
gate, kept when it ends: a gate changes what every later batch norm sees (two split-MNIST
tasks, convnet width 0.5, gating 0.5: task 0 fell from 100% to 46% with the statistics
shared, to 95% with its own).
"""

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from torch.func import functional_call

from clrun.config import NON_NEGATIVE, NULL_OR_AT_LEAST_1, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig, task_loss
from clrun.methods.parts.importance import FisherPenalty, PathIntegralPenalty, Penalty
from clrun.models.gating import GatedLayer, Gates, batch_norm_state, gated_layers
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes


class XdGRegularizer(Enum):
    none = "none"  # gates alone
    ewc = "ewc"  # plus EWC's Fisher penalty (clrun.methods.parts.importance.FisherPenalty)
    si = "si"  # plus SI's path-integral penalty (clrun.methods.parts.importance.PathIntegralPenalty)


@dataclass
class XdGConfig(PerTaskMethodConfig):
    """XdG (Masse et al. 2018): a fixed random binary gate per task on each hidden layer, optionally with EWC or SI."""

    # share of each hidden layer's units a task's gate silences (Masse et al.; van de Ven: 0.9 split)
    gating: float = checked(Rule(lambda v: 0 <= v < 1, "in [0, 1)"), 0.8)
    gate_conv: bool = True  # gate conv channels too (false: linear hidden layers only, as van de Ven's CIFAR runs)
    mask_seed: Optional[int] = None  # seed of the random gates (null: the run's seed)
    regularizer: XdGRegularizer = XdGRegularizer.none
    # regularizer=ewc: lambda in (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
    ewc_lambda: float = checked(NON_NEGATIVE, 1e7)
    # regularizer=ewc: images the Fisher is estimated on (null: all)
    fisher_samples: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)
    si_c: float = checked(NON_NEGATIVE, 50.0)  # regularizer=si: penalty weight c
    epsilon: float = checked(POSITIVE, 0.1)  # regularizer=si: damping xi in omega = W / (delta^2 + xi)


def make_penalty(cfg) -> Penalty | None:
    """The penalty `regularizer` names: offline EWC with predicted-label Fisher, or SI with the total loss's
    gradient (as van de Ven runs them under XdG); None for gates alone."""
    if cfg.regularizer.value == "ewc":
        return FisherPenalty(cfg.ewc_lambda, online=False, gamma=1.0, samples=cfg.fisher_samples, labels="predicted")
    if cfg.regularizer.value == "si":
        return PathIntegralPenalty(cfg.si_c, cfg.epsilon, task_gradient=False)
    return None


def draw_masks(layers: list[GatedLayer], n_tasks: int, gating: float, seed: int) -> list[list[torch.Tensor]]:
    """Per task, per layer: a bool mask keeping all but round(gating x units) units chosen at random
    (van de Ven: int(gating x units); round avoids 0.29 x 100 = 28.99...)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(n_tasks):
        task = []
        for layer in layers:
            keep = torch.ones(layer.units, dtype=torch.bool)
            keep[torch.randperm(layer.units, generator=generator)[: round(gating * layer.units)]] = False
            task.append(keep)
        masks.append(task)
    return masks


class XdG(Method):
    config_class = XdGConfig
    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([])  # laid out for the stream's scenario, as a shared-model method's
        self.penalty = make_penalty(cfg)
        self._attach()
        seed = torch.initial_seed() if cfg.mask_seed is None else cfg.mask_seed
        self.masks = draw_masks(self.layers, len(stream), cfg.gating, seed)
        self.statistics: list[dict[str, torch.Tensor]] = []  # per learned task: batch-norm statistics under its gate

    def _attach(self) -> None:
        """Hook the gates onto the model's hidden layers (again after it is rebuilt by a reload)."""
        layers = gated_layers(self.model.backbone, "xdg")
        self.layers = [g for g in layers if self.cfg.gate_conv or isinstance(g.layer, Linear)]
        if not self.layers:
            raise ClrunError(
                f"method xdg: gate_conv=false leaves no hidden linear layer to gate in {self.backbone_cfg.name}"
            )
        self.gates = Gates(self.layers)

    def task_gates(self, task: int) -> list[torch.Tensor]:
        """Task `task`'s gates as 0/1 floats on the device."""
        return [mask.to(self.hw.device, torch.float32) for mask in self.masks[task]]

    def learn(self, task: Task) -> dict:
        with self.gates.use(self.task_gates(task.index)):
            head = self.model.add_head(task.n_classes)
            params, loss = self.model.trainable(head), task_loss(self.model, task.index, self.stream)
            if self.penalty is None:
                stats = self.fit(task, self.model, params, loss)
            else:
                stats = self.penalty.fit(self, self.model, task, params, loss)
        self.statistics.append(batch_norm_state(self.model, statistics_only=True))
        return stats.row()

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The model's output for `task` under the task's gate and batch-norm statistics."""
        self.model.eval()
        with self.gates.use(self.task_gates(task)):
            return functional_call(self.model, self.statistics[task], (x, task))

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "n_tasks": len(self.model.heads.heads), "masks": self.masks}
        penalty = {} if self.penalty is None else self.penalty.state_dict()
        return {**state, **penalty, "statistics": self.statistics}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]])
        self.model.load_state_dict(state["model"])
        self._attach()
        if self.penalty is not None:
            self.penalty.load_state_dict(state, self.hw.device)
        self.masks = state["masks"]
        self.statistics = [{k: v.to(self.hw.device) for k, v in task.items()} for task in state["statistics"]]

    def footprint(self) -> Footprint:
        """The shared model (and the penalty's terms) plus, per learned task, its gates as bits and its batch-norm
        statistics."""
        base = count_params(self.model.backbone) + count_params(self.model.heads.heads[0])
        stored = 0 if self.penalty is None else self.penalty.bytes()
        learned = len(self.statistics)
        stored += sum(-(-mask.numel() // 8) for task in self.masks[:learned] for mask in task)
        stored += tensor_bytes(t for task in self.statistics for t in task.values())
        return Footprint(count_params(self.model), module_bytes(self.model), base).plus(stored)
