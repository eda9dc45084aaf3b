"""Fine-tuning: one shared backbone trained on each task in turn (the lower bound; van de Ven's "None").

Nothing protects earlier tasks. In the task scenario only the current head is
optimised, so weight decay and momentum leave old heads untouched (an old head's
outputs only change through the shared backbone).
"""

from clrun.data.stream import Task
from clrun.methods.base import SharedModelMethod, task_loss


class Finetune(SharedModelMethod):
    scores_verification = True  # `task_loss` trains a verification task's FaceHead; `embed` is SharedModelMethod's

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes, task.verification)
        loss = task_loss(self.model, task.index, self.stream)
        return self.fit(task, self.model, self.model.trainable(head), loss).row()
