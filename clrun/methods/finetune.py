"""Fine-tuning: one shared backbone trained on each task in turn, one head per task.

The lower bound of task-incremental learning: nothing protects earlier tasks.
Only the current head is optimised, so weight decay and momentum leave old
heads untouched (methods.md §0.4).
"""

from clrun.data.stream import Task
from clrun.methods.base import SharedModelMethod


class Finetune(SharedModelMethod):
    def learn(self, task: Task, progress) -> dict:
        head = self.model.add_head(task.n_classes)
        params = list(self.model.backbone.parameters()) + list(self.model.heads.heads[head].parameters())
        return self.train_task(self.model, params, head, task, progress)
