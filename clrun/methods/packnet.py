"""PackNet (Mallya & Lazebnik, CVPR 2018), as ported to CIFAR-100 by CPG (experiment1/PackNet_cifar100.sh).

Per task: claim every free weight, train them (earlier tasks' weights are used
but frozen), release the smallest-magnitude fraction `prune` of the task's
weights per layer (one-shot), retrain what is left, freeze it. Task k then
predicts with the weights of tasks 1..k only, its own batch norm, biases and
head, so its logits never change afterwards (methods.md §1).
"""

import math

from clrun.config import PruneSchedule
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.sharing import WeightSharingMethod, phase_totals


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

    def __init__(self, cfg, backbone_cfg, stream, hw):
        if not 0.0 <= cfg.prune < 1.0:
            raise ClrunError(f"method.prune={cfg.prune} is invalid: it must be in [0, 1)")
        super().__init__(cfg, backbone_cfg, stream, hw)

    def learn(self, task: Task, progress) -> dict:
        tag = task.index + 1
        self.net.begin_task(tag, picking=False)
        claimed = int(self.net.owner_counts()[tag])
        self.add_head(task)
        rows = [self.train_phase(task, self.cfg.train, progress, "train")]
        fraction = prune_fraction(self.cfg, task.index, len(self.stream))
        if fraction > 0:  # an unpruned task has nothing to retrain (PackNet's prune -1)
            self.net.prune(tag, fraction)
            rows.append(self.train_phase(task, self.cfg.retrain, progress, f"retrain after pruning {fraction:.3g}"))
        self.net.end_task(tag)
        released = claimed - int(self.net.owner_counts()[tag])
        return {
            **phase_totals(rows),
            "train_loss": rows[0]["train_loss"],
            "retrain_loss": rows[1]["train_loss"] if len(rows) > 1 else math.nan,
            "prune": fraction,  # the fraction asked for
            "sparsity": released / claimed if claimed else math.nan,  # the fraction of claimed weights released
            **self.shares(tag),
        }
