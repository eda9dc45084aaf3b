"""Experience replay (ER): fine-tuning with a replay memory of earlier tasks' images mixed into every batch.

The memory, its policies and the loss weighting are in `clrun.methods.replay`;
this is van de Ven et al.'s ER baseline. `lwf` and `ewc` take the same memory
through their `replay` option.
"""

from clrun.data.stream import Task
from clrun.methods.base import task_loss
from clrun.methods.replay import Replaying
from clrun.train import fit


class ER(Replaying):
    def learn(self, task: Task, progress) -> dict:
        head = self.model.add_head(task.n_classes)
        stats = fit(
            self.model,
            self.replay_trainable(head),
            self.replayed(task_loss(self.model, task.index, self.stream), task.index),
            (task.train.x, task.train.y),
            self.cfg.train,
            self.stream,
            self.hw,
            progress,
            f"task {task.index} {task.name}",
        )
        self.remember(task)
        return stats.row()
