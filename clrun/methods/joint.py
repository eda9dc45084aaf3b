"""Joint training: after each task, multi-task training on all data seen so far.

The upper bound in every scenario. Batches mix tasks; each sample is scored
as its own task's (`mixed_task_loss`). With `reinit` (the default) each row of
the accuracy matrix comes from a model trained jointly from scratch on tasks
0..t, independent of the order; without it training continues from the last model.
"""

from dataclasses import dataclass

import torch

from clrun.data.stream import Task
from clrun.methods.base import MethodConfig, SharedModelMethod, mixed_task_loss


@dataclass
class JointConfig(MethodConfig):
    reinit: bool = True  # start each task's joint training from a fresh model


class Joint(SharedModelMethod):
    config_class = JointConfig

    def learn(self, task: Task) -> dict:
        seen = self.stream.tasks[: task.index + 1]
        if self.cfg.reinit:
            self.model = self.new_model(seen)
        else:
            self.model.add_head(task.n_classes)
        x = torch.cat([t.train.x for t in seen])
        y = torch.cat([t.train.y for t in seen])
        t = torch.cat([torch.full_like(s.train.y, s.index) for s in seen])
        loss = mixed_task_loss(self.model, self.stream, len(seen))
        stats = self.fit(task, self.model, self.model.parameters(), loss, phase="joint", data=(x, y, t), mixed=True)
        return stats.row()
