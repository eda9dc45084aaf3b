"""Synaptic intelligence (Zenke, Poole & Ganguli 2017), as van de Ven et al. run it (GMvandeVen/continual-learning).

While learning a task every step adds to each weight's path integral of the loss; at the task's end the
integral, divided by the squared change plus `epsilon`, becomes its importance, and the penalty
c * sum_i omega_i (theta_i - anchor_i)^2 ties it to its value there
(`clrun.methods.parts.importance.PathIntegralPenalty` has the details and the `task_gradient` option).
"""

from dataclasses import dataclass

from clrun.config import NON_NEGATIVE, POSITIVE, checked
from clrun.methods.base import MethodConfig, SharedModelMethod
from clrun.methods.parts.importance import PathIntegralPenalty, Penalised


@dataclass
class SIConfig(MethodConfig):
    """Synaptic intelligence (Zenke et al. 2017): importance from each weight's path integral of the loss."""

    si_c: float = checked(NON_NEGATIVE, 50.0)  # penalty weight c (van de Ven 2019: split MNIST task-IL)
    epsilon: float = checked(POSITIVE, 0.1)  # damping xi in omega = W / (delta^2 + xi)
    task_gradient: bool = False  # path integral with the task loss's gradient (Zenke et al.'s code), not the total's


class SI(Penalised, SharedModelMethod):
    config_class = SIConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.penalty = PathIntegralPenalty(cfg.si_c, cfg.epsilon, cfg.task_gradient)
