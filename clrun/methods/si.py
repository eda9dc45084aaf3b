"""Synaptic intelligence (Zenke, Poole & Ganguli 2017), as van de Ven et al. run it (GMvandeVen/continual-learning).

While learning a task, every step adds W_i -= g_i * (theta_i after - theta_i before), the path integral
of the loss along the parameter's trajectory; g is the gradient the step used. At the task's end,
omega_i += W_i / (delta_i^2 + epsilon), delta = the parameter's change over the task, and the anchor
moves to the current parameters. The penalty is c * sum_i omega_i (theta_i - anchor_i)^2 (no 1/2).

g defaults to the gradient of the total loss (task loss plus penalty), as in van de Ven's code, whose
published numbers we compare with; `task_gradient: true` uses the task loss's gradient alone as Zenke
et al.'s code does, obtained for free by subtracting the penalty's closed-form gradient
2 c omega (theta - anchor). Neither applies Zenke et al.'s ReLU clamp on omega (van de Ven does not).
"""

import torch

from clrun.data.stream import Task
from clrun.methods.regularization import Regularization, Tensors


class SI(Regularization):
    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.trained: dict[str, torch.nn.Parameter] = {}
        self.start: Tensors = {}  # parameters at the task's start
        self.previous: Tensors = {}  # parameters before the current step
        self.path: Tensors = {}  # W

    @property
    def penalty_weight(self) -> float:
        return self.cfg.si_c

    def begin(self, trained: dict[str, torch.nn.Parameter]) -> None:
        self.trained = trained
        self.start = {n: p.detach().clone() for n, p in trained.items()}
        self.previous = {n: p.detach().clone() for n, p in trained.items()}
        self.path = {n: torch.zeros_like(p) for n, p in trained.items()}

    def after_step(self, step: int) -> None:
        """Add this step's contribution -g * (theta - theta before) to the path integral W."""
        omega, anchor = (self.importance[0], self.anchors[0]) if self.importance else ({}, {})
        for name, p in self.trained.items():
            if p.grad is None:
                continue
            grad = p.grad
            if self.cfg.task_gradient and name in omega:
                grad = grad - 2 * self.cfg.si_c * omega[name] * (self.previous[name] - anchor[name])
            self.path[name] -= grad * (p.detach() - self.previous[name])
            self.previous[name].copy_(p.detach())

    def consolidate(self, task: Task, trained: dict[str, torch.nn.Parameter]) -> None:
        omega, anchor = (self.importance[0], self.anchors[0]) if self.importance else ({}, {})
        for name, p in trained.items():
            added = self.path[name] / ((p.detach() - self.start[name]).square() + self.cfg.epsilon)
            omega[name] = omega[name] + added if name in omega else added
            anchor[name] = p.detach().clone()
        self.importance, self.anchors = [omega], [anchor]
        self.trained, self.start, self.previous, self.path = {}, {}, {}, {}
