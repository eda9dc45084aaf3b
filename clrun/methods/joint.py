"""Joint training: after each task, multi-task training on all data seen so far.

The upper bound of task-incremental learning. Batches mix tasks; each sample's
loss comes from its own task's head. With `reinit` (the default) each row of
the accuracy matrix comes from a model trained jointly from scratch on tasks
0..t, independent of the order; without it training continues from the last model.
"""

import torch
import torch.nn.functional as F

from clrun.data.stream import Task
from clrun.methods.base import SharedModelMethod
from clrun.models import TaskModel
from clrun.train import fit


def joint_loss(model: TaskModel, n_tasks: int):
    """Mean cross-entropy of each sample under its own task's head (no host sync)."""

    def loss(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = model.features(x)
        total = features.new_zeros(())
        for k in range(n_tasks):
            logits = model.heads(features, k)
            per_sample = F.cross_entropy(logits, y.clamp(max=logits.shape[1] - 1), reduction="none")
            total = total + (per_sample * (t == k)).sum()
        return total / len(x)

    return loss


class Joint(SharedModelMethod):
    def learn(self, task: Task, progress) -> dict:
        seen = self.stream.tasks[: task.index + 1]
        if self.cfg.reinit:
            self.model = self.new_model(seen)
        else:
            self.model.add_head(task.n_classes)
        x = torch.cat([t.train.x for t in seen])
        y = torch.cat([t.train.y for t in seen])
        t = torch.cat([torch.full_like(s.train.y, s.index) for s in seen])
        stats = fit(
            self.model,
            self.model.parameters(),
            joint_loss(self.model, len(seen)),
            (x, y, t),
            self.cfg.train,
            self.stream,
            self.hw,
            progress,
            f"tasks 0-{task.index} joint",
        )
        return stats.row()
