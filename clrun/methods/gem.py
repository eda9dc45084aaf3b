"""GEM, Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017), after facebookresearch/GradientEpisodicMemory
model/gem.py (and run_experiments.sh for the recipe).

An episodic memory per task (`replay.budget` split over the stream's tasks: the code's `n_memories` per task, 256 in
its experiments). At every step on task t, the gradient g_k of each earlier task's loss on its whole memory (the
earlier tasks' heads in the task scenario, as the code's CIFAR offsets; every class seen in the class scenario;
the shared head in the domain scenario, the code's MNIST), then the current batch's gradient g; when some
g.g_k < 0, g is replaced by the solution of the paper's QP through its dual, as `project2cone2`:
min_v 1/2 v'(GG' + eps I)v + (Gg)'v, v >= memory_strength, g~ = G'v + g (`parts.gradient_projection`; the code's
quadprog replaced by an exact active-set solver). A plain SGD step follows (the code's recipe: lr 0.1, batch 10,
one epoch, no momentum: this config's defaults).

Departures: the code fills each task's memory as a ring buffer while it streams the task (its last `n_memories`
examples, the counter carried over from the previous task); here a task's slots get a uniform sample of its
training images after the task (`per_task` policy): for a single shuffled pass the same distribution. Memory
images go through the stream's training view (augmented when the stream augments; the code stores its inputs).
The code's CIFAR masks other tasks' logits of one shared layer; here each task has its own head (equal logits).
The class scenario, not in the code, scores every memory over all classes seen (as mammoth's GEM does).
"""

from dataclasses import dataclass, field

import torch

from clrun.config import NON_NEGATIVE, checked
from clrun.data.stream import Task
from clrun.methods.base import MethodConfig, task_loss
from clrun.methods.parts.gradient_projection import flat_grad, flat_gradient, gem_project, write_grad
from clrun.methods.parts.replay import ReplayConfig, Replaying, ReplayPolicy
from clrun.train import Optimizer, TrainConfig


@dataclass
class GEMConfig(MethodConfig):
    """GEM: each step's gradient projected so that no earlier task's memory loss increases (a QP per step)."""

    # the code's recipe: one epoch of plain SGD (no momentum) in batches of 10, lr 0.1
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer=Optimizer.sgd, lr=0.1, momentum=0.0, epochs=1, batch_size=10)
    )
    # the episodic memory: budget // n_tasks images per task of the stream (GEM's experiments: 256 per task)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=2560, policy=ReplayPolicy.per_task))
    # the code's margin (the paper's gamma): the dual variables v >= memory_strength; 0: the paper's exact projection
    memory_strength: float = checked(NON_NEGATIVE, 0.5)
    eps: float = checked(NON_NEGATIVE, 1e-3)  # ridge added to GG' in the dual QP (the code's eps)


class GEM(Replaying):
    config_class = GEMConfig

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes)
        earlier = sorted(set(self.memory.t.tolist())) if len(self.memory) else []
        params = list(self.model.parameters()) if earlier else self.model.trainable(head)
        current = task_loss(self.model, task.index, self.stream)
        memory_losses = [(k, task_loss(self.model, k, self.stream), self.memory.task_images(k)) for k in earlier]
        held = {}
        projected = 0

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            # each earlier task's gradient on its whole memory, before the current batch's (as the code)
            rows = []
            for _, memory_loss, index in memory_losses:
                mx, my, _ = self.memory.batch(index, self.stream, self.hw)
                rows.append(flat_gradient(memory_loss(mx, my, step), params))
            held["G"] = torch.stack(rows) if rows else None
            return current(x, y, step)

        def after_backward(step, optimizers) -> None:
            nonlocal projected
            G = held.pop("G")
            if G is None:
                return
            g = flat_grad(params)
            if bool((G @ g < 0).any()):
                write_grad(params, gem_project(g, G, self.cfg.memory_strength, self.cfg.eps))
                projected += 1

        stats = self.fit(task, self.model, params, loss, after_backward=after_backward)
        self.remember(task)
        return {**stats.row(), "projected_steps": projected}
