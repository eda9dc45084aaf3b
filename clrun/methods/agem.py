"""A-GEM, Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019), after
facebookresearch/agem (model/model.py for the projection, fc_permute_mnist.py and replicate_results_iclr19.sh for
the memory and the recipe).

An episodic memory of `replay.budget` images split over the stream's tasks and, within a task, over its classes
(the code: `mem_size` 25 per class, 250 per permuted-MNIST task). From the second task on, every step computes one
reference gradient g_ref on `reference_batch` images drawn without replacement from the memory of all earlier
tasks (all of it when it holds fewer; the code's `eps_mem_batch` 256), each image scored under its own task (its
head in the task scenario, every class seen in the class scenario, the shared head in the domain scenario), then
the current batch's gradient g; when g.g_ref < 0 the step uses g - (g.g_ref / g_ref.g_ref) g_ref
(`parts.gradient_projection.agem_project`). Plain SGD, one epoch, batch 10, lr 0.1 (the code's MNIST recipe;
its CIFAR one is lr 0.03).

Departures: the code fills a task's per-class slots as ring buffers while it streams the task (the last 25 of each
class); here they get a uniform sample of the class's training images after the task (`per_task_class`), the same
distribution for a single shuffled pass. In the task scenario each task has its own head, where the code masks the
logits of one shared layer.
"""

from dataclasses import dataclass, field

import torch

from clrun.config import AT_LEAST_1, checked
from clrun.data.stream import Task
from clrun.methods.base import MethodConfig, mixed_task_loss, task_loss
from clrun.methods.parts.gradient_projection import agem_project, flat_grad, flat_gradient, write_grad
from clrun.methods.parts.replay import ReplayConfig, Replaying, ReplayPolicy
from clrun.train import Optimizer, TrainConfig


@dataclass
class AGEMConfig(MethodConfig):
    """A-GEM: each step's gradient projected onto the half-space of one reference gradient on the memory."""

    # the code's recipe: one epoch of plain SGD (no momentum) in batches of 10, lr 0.1 (permuted MNIST)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer=Optimizer.sgd, lr=0.1, momentum=0.0, epochs=1, batch_size=10)
    )
    # the episodic memory: budget // n_tasks images per task of the stream, split over its classes (A-GEM: 250)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=2500, policy=ReplayPolicy.per_task_class))
    reference_batch: int = checked(AT_LEAST_1, 256)  # memory images per reference gradient (the code's eps_mem_batch)


class AGEM(Replaying):
    config_class = AGEMConfig

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes)
        params = list(self.model.parameters()) if len(self.memory) else self.model.trainable(head)
        current = task_loss(self.model, task.index, self.stream)
        reference_loss = mixed_task_loss(self.model, self.stream, task.index)
        held = {}
        projected = 0

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            if len(self.memory):  # the reference gradient first, as the code
                index = torch.randperm(len(self.memory))[: self.cfg.reference_batch].to(self.memory.y.device)
                mx, my, mt = self.memory.batch(index, self.stream, self.hw)
                held["ref"] = flat_gradient(reference_loss(mx, my, mt, step), params)
            return current(x, y, step)

        def after_backward(step, optimizers) -> None:
            nonlocal projected
            g_ref = held.pop("ref", None)
            if g_ref is None:
                return
            g = flat_grad(params)
            update = agem_project(g, g_ref)
            if update is not g:
                write_grad(params, update)
                projected += 1

        stats = self.fit(task, self.model, params, loss, after_backward=after_backward)
        self.remember(task)
        return {**stats.row(), "projected_steps": projected}
