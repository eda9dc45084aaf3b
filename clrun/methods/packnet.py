"""PackNet (Mallya & Lazebnik, CVPR 2018), as ported to CIFAR-100 by CPG (experiment1/PackNet_cifar100.sh).

Per task: claim every free weight, train them (earlier tasks' weights are used
but frozen), release the smallest-magnitude fraction `prune` of the task's
weights per layer (one-shot), retrain what is left, freeze it. Task k then
predicts with the weights of tasks 1..k only, its own batch norm, biases and
head, so its logits never change afterwards.
"""

import math
from dataclasses import dataclass, field
from enum import Enum

from clrun.config import FRACTION, checked
from clrun.data.stream import Task
from clrun.methods.parts.weight_sharing import WeightSharingConfig, WeightSharingMethod, cpg_recipe
from clrun.train import FitStats, TrainConfig


class PruneSchedule(Enum):
    fixed = "fixed"  # release the same fraction `prune` of each task's weights
    equal_share = "equal_share"  # task k of N keeps 1/(N-k+1) of its pool: equal capacity for every task


@dataclass
class PackNetConfig(WeightSharingConfig):
    """PackNet as in CPG's CIFAR-100 port (experiment1/PackNet_cifar100.sh)."""

    train: TrainConfig = field(default_factory=cpg_recipe)
    retrain: TrainConfig = field(default_factory=lambda: cpg_recipe(epochs=30, lr=1e-3, milestones=[25]))
    prune: float = checked(FRACTION, 0.6)  # fraction of the task's weights released by the one-shot magnitude prune
    prune_schedule: PruneSchedule = PruneSchedule.fixed
    prune_last: bool = True  # prune the last task too (CPG's port does; PackNet's own scripts do not)


def prune_fraction(cfg, index: int, n_tasks: int) -> float:
    """The fraction of task `index`'s pool (0-based, of `n_tasks`) that its one-shot prune releases.

    `fixed`: `cfg.prune` for every task. `equal_share`: task k keeps 1/(N-k) of its pool, so every
    task ends with about 1/N of each layer and the last one is not pruned. `prune_last=false`:
    the last task is not pruned (PackNet's own `0.75,0.75,-1`).
    """
    if index == n_tasks - 1 and not cfg.prune_last:
        return 0.0
    if cfg.prune_schedule == PruneSchedule.equal_share:
        return 1.0 - 1.0 / (n_tasks - index)
    return float(cfg.prune)


class PackNet(WeightSharingMethod):
    """Train the free weights, prune a fraction of them, retrain; earlier tasks' weights stay frozen."""

    config_class = PackNetConfig

    def learn(self, task: Task) -> dict:
        cfg, tag = self.task_cfg(task), task.index + 1
        self.net.begin_task(tag, picking=False)
        claimed = int(self.net.owner_counts()[tag])
        self.add_head(task)
        phases = [self.train_phase(task, cfg.train, "train")[0]] if self.trains(task) else []
        # a task without training images (ImageNet without its train folder) is not pruned: it could not retrain
        fraction = prune_fraction(cfg, task.index, len(self.stream)) if len(task.train) else 0.0
        if fraction > 0:  # an unpruned task has nothing to retrain (PackNet's prune -1)
            self.net.prune(tag, fraction)
            phases.append(self.train_phase(task, cfg.retrain, f"retrain after pruning {fraction:.3g}")[0])
        self.net.end_task(tag)
        released = claimed - int(self.net.owner_counts()[tag])
        return {
            **FitStats.total(phases).row(),
            "train_loss": phases[0].loss if self.trains(task) else math.nan,
            "retrain_loss": phases[-1].loss if fraction > 0 else math.nan,
            "prune": fraction,  # the fraction asked for
            "sparsity": released / claimed if claimed else math.nan,  # the fraction of claimed weights released
            **self.shares(tag),
        }
