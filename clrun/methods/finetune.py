"""Fine-tuning: one shared backbone trained on each task in turn (the lower bound; van de Ven's "None").

Nothing protects earlier tasks. In the task scenario only the current head is
optimised, so weight decay and momentum leave old heads untouched (methods.md §0.4).
"""

from clrun.data.stream import Task
from clrun.methods.base import SharedModelMethod


class Finetune(SharedModelMethod):
    def learn(self, task: Task, progress) -> dict:
        head = self.model.add_head(task.n_classes)
        return self.train_task(self.model, self.model.trainable(head), task, progress)
