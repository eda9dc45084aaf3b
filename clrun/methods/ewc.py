"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018), as van de Ven et al.
run them (GMvandeVen/continual-learning), optionally with a replay memory.

The Fisher and the penalty are `clrun.methods.parts.importance.FisherPenalty` (its docstring has the details):
the Fisher from the model's own predictions, in eval mode, per sample, for the parameters trained on the task
(heads included; in the task scenario other heads have zero Fisher anyway). Offline (`online: false`): one
penalty per earlier task, stored folded into one quadratic (sum_j F_j, the F-weighted mean anchor and the minimum),
so that a step costs the same at task 50 as at task 2: the penalty, its gradient and so the accuracy matrices equal
those of one term per task within float tolerance, not bit for bit. Online: one running Fisher F <- gamma F + F_t
anchored at the last task.
With `replay` (budget > 0) the task's loss is mixed with replayed batches as ER mixes them.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from clrun.config import NON_NEGATIVE, NULL_OR_AT_LEAST_1, Rule, checked
from clrun.data.stream import Task
from clrun.methods.base import MethodConfig, task_loss
from clrun.methods.parts.importance import FisherPenalty, Penalised
from clrun.methods.parts.replay import ReplayConfig, Replaying


class FisherLabels(Enum):
    predicted = "predicted"  # the gradient at the model's predicted class (van de Ven's 2019 code: the MNIST tables)
    expectation = "expectation"  # the exact expectation over classes weighted by p(c|x) (van de Ven's 2022 code)


@dataclass
class EWCConfig(MethodConfig):
    """EWC (Kirkpatrick et al. 2017): one Fisher penalty per earlier task; `online`: one running Fisher."""

    # penalty weight lambda in (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
    ewc_lambda: float = checked(NON_NEGATIVE, 1e7)
    online: bool = False  # online EWC (Schwarz et al. 2018): F <- gamma F + F_t, anchored at the last task
    gamma: float = checked(Rule(lambda v: 0 < v <= 1, "in (0, 1]"), 1.0)  # online only: decay of the running Fisher
    # training images the Fisher is estimated on (null: all of the task's)
    fisher_samples: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)
    fisher_labels: FisherLabels = FisherLabels.predicted
    replay: ReplayConfig = field(default_factory=ReplayConfig)


class EWC(Penalised, Replaying):
    config_class = EWCConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.penalty = FisherPenalty(cfg.ewc_lambda, cfg.online, cfg.gamma, cfg.fisher_samples, cfg.fisher_labels.value)

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes)
        loss = self.replayed(task_loss(self.model, task.index, self.stream), task.index)
        stats = self.penalty.fit(self, self.model, task, self.replay_trainable(head), loss)
        self.remember(task)
        return stats.row()
