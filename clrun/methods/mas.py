"""Memory aware synapses (Aljundi et al. 2018).

After each task a parameter's importance is the mean over the task's training images of
|d ||f(x)||^2 / d theta| (f the task's logits, per sample, eval mode); importance adds up over tasks and the
penalty lambda * sum_i Omega_i (theta_i - anchor_i)^2 ties it to its value at the last task's end
(`clrun.methods.parts.importance.MASPenalty` has the details and how they differ from other ports).
"""

from dataclasses import dataclass
from typing import Optional

from clrun.config import NON_NEGATIVE, NULL_OR_AT_LEAST_1, checked
from clrun.methods.base import MethodConfig, SharedModelMethod
from clrun.methods.parts.importance import MASPenalty, Penalised


@dataclass
class MASConfig(MethodConfig):
    """Memory aware synapses (Aljundi et al. 2018): importance = mean |gradient of the squared output norm|."""

    mas_lambda: float = checked(NON_NEGATIVE, 1.0)
    # training images the importance is estimated on (null: all)
    importance_samples: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)


class MAS(Penalised, SharedModelMethod):
    config_class = MASConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.penalty = MASPenalty(cfg.mas_lambda, cfg.importance_samples)
