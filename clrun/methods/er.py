"""Experience replay (ER): fine-tuning with a replay memory of earlier tasks' images mixed into every batch.

The memory, its policies and the loss weighting are in `clrun.methods.parts.replay`;
this is van de Ven et al.'s ER baseline. `lwf` and `ewc` take the same memory
through their `replay` option.
"""

from dataclasses import dataclass, field

from clrun.data.stream import Task
from clrun.methods.base import MethodConfig, task_loss
from clrun.methods.parts.replay import ReplayConfig, Replaying


@dataclass
class ERConfig(MethodConfig):
    """Experience replay: fine-tuning with a replay memory (van de Ven's ER: loss 1/t current + (1-1/t) replay)."""

    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=1000))


class ER(Replaying):
    config_class = ERConfig

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes)
        loss = self.replayed(task_loss(self.model, task.index, self.stream), task.index)
        stats = self.fit(task, self.model, self.replay_trainable(head), loss)
        self.remember(task)
        return stats.row()
