"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): binary masks over a frozen backbone.

Task 1 trains the whole backbone (or fine-tunes a pretrained one), which is
then frozen. Every later task learns only a real-valued mask per weight,
binarised at `threshold` with a straight-through gradient, and its head.
Batch norm stays at task 1's values for later tasks unless
`train_bn` (Piggyback's `train_nobn`: BN in eval mode, its parameters not
optimised), so a task's logits never change after it is learned.
"""

import math
from dataclasses import dataclass, field

from clrun.data.stream import Task
from clrun.methods.parts.weight_sharing import WeightSharingConfig, WeightSharingMethod, cpg_recipe
from clrun.models.shared_net import shared_layers
from clrun.train import FitStats, Optimizer, Schedule, TrainConfig


@dataclass
class PiggybackConfig(WeightSharingConfig):
    """Piggyback: task 1 trains the backbone, later tasks learn binary masks over it (arunmallya/piggyback)."""

    train: TrainConfig = field(default_factory=cpg_recipe)  # task 1's backbone training
    # masks and head of tasks >= 2 (Adam 1e-4, x0.1 every 15 epochs)
    mask_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=30,
            batch_size=32,
            optimizer=Optimizer.adam,
            lr=1e-4,
            schedule=Schedule.multistep,
            milestones=[15],
            gamma=0.1,
        )
    )
    mask_init: float = 1e-2
    threshold: float = 5e-3
    train_bn: bool = False  # train per-task batch norm on tasks >= 2 (Piggyback's default: frozen)


class Piggyback(WeightSharingMethod):
    """Task 1 trains the backbone; tasks >= 2 learn a binary mask over it and a head."""

    config_class = PiggybackConfig

    def learn(self, task: Task) -> dict:
        cfg, tag = self.task_cfg(task), task.index + 1
        if task.index == 0:
            self.net.begin_task(tag, picking=False)
            self.add_head(task)
            stats, train_acc = FitStats.total([]), math.nan  # the pretrained backbone (train_first_task: false)
            if self.trains(task):
                stats, train_acc = self.train_phase(task, cfg.train, "backbone")
            self.net.end_task(tag)
            return {**self._row(stats, train_acc), "picked_share": math.nan, **self.shares(tag)}
        # every mask is over task 1's network: batch norm and biases start from task 1's too (with `train_bn`
        # they would otherwise continue from the previous task's; without it they never left task 1's)
        self.net.backbone.load_state_dict(self.net.records[0]["private"], strict=False)
        self.net.begin_task(tag, picking=True, mask_init=cfg.mask_init, threshold=cfg.threshold)
        self.add_head(task)
        stats, train_acc = self._mask_phase(task, cfg)
        record = self.net.end_task(tag)
        return {**self._row(stats, train_acc), "picked_share": self._picked_share(record, tag), **self.shares(tag)}

    @staticmethod
    def _row(stats: FitStats, train_acc: float) -> dict:
        return {**stats.row(), "train_acc": train_acc}

    def _mask_phase(self, task: Task, cfg) -> tuple[FitStats, float]:
        """Train the masks and the head (Adam, `mask_train`); per-task batch norm and biases only with `train_bn`."""
        return self.train_phase(
            task,
            cfg.mask_train,
            "masks",
            mask_cfg=cfg.mask_train,
            train_weights=False,
            train_private=cfg.train_bn,
            freeze_bn=not cfg.train_bn,
        )

    def _picked_share(self, record: dict, tag: int) -> float:
        """The fraction of earlier tasks' weights that task `tag`'s stored binary mask keeps."""
        layers = shared_layers(self.net.backbone)
        picked = sum(int(pick.sum()) for pick in record["pick"].values())
        earlier = sum(int(((layer.owner >= 1) & (layer.owner < tag)).sum()) for layer in layers.values())
        return picked / earlier if earlier else math.nan
