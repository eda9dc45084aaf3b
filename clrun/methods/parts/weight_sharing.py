"""The base of the weight-sharing methods (PackNet, Piggyback, PAE, CPG): one `SharedNet`, per-task views.

A subclass's `learn` composes the phases offered here (train, prune, grow,
retrain) into its recipe. Prediction, persistence and storage accounting are
shared: task k always predicts through its own view of the shared weights, so
its logits never change after it is learned.
"""

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clrun.config import Rule, checked
from clrun.data.stream import Pairs, Split, Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskRecipeConfig
from clrun.models import build_backbone
from clrun.models.faces import angle_loss, class_weights
from clrun.models.heads import start_from_classifier
from clrun.models.shared_net import SharedNet
from clrun.results import Footprint
from clrun.train import FitStats, Optimizer, Schedule, TrainConfig, accuracy, verification


def cpg_recipe(**changes) -> TrainConfig:
    """CPG's CIFAR-100 training recipe (ivclab/CPG experiment1): SGD-Nesterov, lr 1e-2 x0.1 at epochs 50 and 80,
    weight decay 4e-5, batch 32, 100 epochs; with `changes`. PackNet's and Piggyback's CIFAR-100 ports use it too."""
    recipe = dict(
        epochs=100,
        batch_size=32,
        optimizer=Optimizer.sgd,
        lr=1e-2,
        momentum=0.9,
        nesterov=True,
        weight_decay=4e-5,
        schedule=Schedule.multistep,
        milestones=[50, 80],
        gamma=0.1,
    )
    return TrainConfig(**{**recipe, **changes})


@dataclass
class WeightSharingConfig(PerTaskRecipeConfig):
    """What the weight-sharing methods share: per-task recipes, the pretrained first task."""

    # class counts n_c (N their sum) weighting the task's cross-entropy by (N - n_c) / n_c; null: unweighted (CPG's
    # expression task: AffectNet's counts, through task_overrides)
    class_counts: Optional[list[float]] = checked(
        Rule(lambda v: len(v) > 0 and all(c > 0 for c in v), "null or a list of positive counts"), None
    )
    # false: task 1 is not trained: it is the pretrained backbone with its ImageNet classifier as head
    # (backbone.pretrained=imagenet backbone.imagenet_head=true), as it is; CPG and PackNet then prune it (CPG's and
    # Piggyback's ImageNet task)
    train_first_task: bool = True


class FrozenBatchNorm(nn.Module):
    """Wraps a network for `fit`, whose `module.train()` would switch batch norm to batch statistics:
    here every batch-norm layer stays in eval mode (running statistics used, never updated)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True) -> "FrozenBatchNorm":
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class WeightSharingMethod(Method):
    """Holds the `SharedNet` and the phases weight-sharing recipes are made of."""

    picking = False  # whether tasks learn a picking mask over earlier tasks' weights
    starts_head_from_classifier = True
    scores_verification = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        views = OmegaConf.merge(backbone_cfg, {"pretrained": None, "imagenet_head": False})  # loaded once, below

        def build(channels: float):
            return build_backbone(OmegaConf.merge(views, {"width": backbone_cfg.width * channels}), stream.input_shape)

        for task in stream.tasks:
            counts = self.class_counts(task)
            if counts is not None and len(counts) != task.n_classes:
                raise ClrunError(
                    f"method.class_counts of task {task.name}: {len(counts)} counts for its {task.n_classes} classes"
                )
        if not cfg.get("train_first_task", True) and not backbone_cfg.get("imagenet_head"):
            raise ClrunError(
                "method.train_first_task=false: task 1 must be a pretrained network with its classifier; set "
                "backbone.pretrained=imagenet backbone.imagenet_head=true"
            )
        self.net = SharedNet(build)
        self.classifier = None  # the pretrained classifier task 0's head starts from (`backbone.imagenet_head`)
        if backbone_cfg.pretrained:
            pretrained = build_backbone(backbone_cfg, stream.input_shape)
            # the shared net's own buffers (owner maps) are not in a pretrained file; every weight must be
            missing, unexpected = self.net.backbone.load_state_dict(pretrained.state_dict(), strict=False)
            assert not unexpected and all(key.endswith("owner") for key in missing), (missing, unexpected)
            self.classifier = getattr(pretrained, "imagenet_head", None)
        self.net = self.hw.prepare_model(self.net)

    def trains(self, task: Task) -> bool:
        """Whether `task` trains (false only for a pretrained first task, `train_first_task: false`)."""
        return task.index > 0 or self.cfg.train_first_task

    # ---- phases ------------------------------------------------------------------------
    def add_head(self, task: Task) -> int:
        """A head for `task` at the current width (a verification task's: CPG's `FaceHead`)."""
        head = self.net.heads.add(self.net.backbone.out_features, task.n_classes, task.verification)
        if task.index == 0 and self.classifier is not None and not task.verification:
            start_from_classifier(self.net.heads.heads[head], self.classifier)
        self.net.heads.heads[head].to(self.net.device)
        return head

    def train_phase(
        self,
        task: Task,
        cfg,
        label: str,
        mask_cfg=None,
        train_weights: bool = True,
        train_private: bool = True,
        freeze_bn: bool = False,
        after_step=None,
        after_epoch=None,
        validate=None,
    ) -> tuple[FitStats, float]:
        """Train the current task under `cfg`: its head, its own shared weights (`train_weights`), its batch norm
        and biases (`train_private`), and its picking masks under `mask_cfg` when given. Weight decay goes to its
        own weights only (CPG). `freeze_bn` keeps batch norm in eval mode (Piggyback's `train_nobn`). `validate`
        as `Trainer.fit` takes it (default: the live network's test accuracy, for a plateau schedule). Returns the
        `FitStats` and the running accuracy of the last epoch in train mode (as CPG measures it)."""
        net, head = self.net, task.index
        params = list(net.heads.heads[head].parameters())
        if train_private:
            params += net.private_parameters()
        if train_weights:
            params += net.shared_weights()
        picks = net.picks()
        groups = [(picks, mask_cfg)] if mask_cfg is not None and picks else []
        tally = {"correct": None, "seen": 0}
        criterion = self.criterion(task)

        def validate_live() -> float:
            return self.current_accuracy(task, task.test)

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            if step.batch == 0:  # a new epoch: count its accuracy afresh
                tally["correct"], tally["seen"] = torch.zeros((), dtype=torch.long, device=y.device), 0
            features = net.backbone(x)
            value, logits = criterion(features, y, step)
            tally["correct"] = tally["correct"] + (logits.argmax(1) == y).sum()
            tally["seen"] += len(y)
            return value

        net.own_weight_decay(cfg.weight_decay if train_weights else 0.0)  # in the masked weights' backward pass
        try:
            stats = self.fit(
                task,
                FrozenBatchNorm(net) if freeze_bn else net,
                params,
                loss,
                OmegaConf.merge(cfg, {"weight_decay": 0.0}),
                label,
                groups=groups,
                after_step=after_step,
                after_epoch=after_epoch,
                validate=validate or (validate_live if cfg.schedule.value == "plateau" else None),
            )
        finally:
            net.own_weight_decay(0.0)
        return stats, tally["correct"].item() / tally["seen"]

    def criterion(self, task: Task):
        """The current task's loss on backbone features: (features, labels, step) -> (loss, logits). A verification
        task's `FaceHead` trains with A-Softmax (`angle_loss`, its lambda counting the phase's steps as CPG's
        `AngleLoss` counts its calls); a task with class counts (`class_counts(task)`) with cross-entropy weighted
        (N - n_c) / n_c (CPG's expression task); any other with plain cross-entropy."""
        head = self.net.heads.heads[task.index]
        if task.verification:

            def angular(features: torch.Tensor, y: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
                cos, phi = head.angular(features)
                return angle_loss((cos, phi), y, step.number + 1), cos

            return angular
        counts = self.class_counts(task)  # as many as the task's classes: checked in __init__
        weight = None if counts is None else class_weights(list(counts)).to(self.net.device)

        def cross_entropy(features: torch.Tensor, y: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
            logits = head(features)
            return F.cross_entropy(logits, y, weight=None if weight is None else weight.to(logits.dtype)), logits

        return cross_entropy

    def class_counts(self, task: Task) -> list[float] | None:
        """The class counts whose weights (N - n_c) / n_c task `task`'s cross-entropy takes (None: unweighted):
        its config's `class_counts` (`task_cfg`)."""
        return self.task_cfg(task).get("class_counts")

    def current_accuracy(self, task: Task, split: Split | Pairs) -> float:
        """Accuracy of the task being learned (live masks), e.g. to compare with its goal; of a verification task's
        pairs, the mean over their folds (CPG's LFW score)."""
        with self.trainer.status(f"task {task.index} {task.name}", "measuring its accuracy"):
            return self._current_accuracy(task, split)

    def _current_accuracy(self, task: Task, split: Split | Pairs) -> float:
        self.net.eval()
        if isinstance(split, Pairs):
            embed = lambda x: self.net.embed_current(x, task.index)  # noqa: E731
            return verification(embed, split, self.stream, self.hw, self.cfg.eval_batch_size, task.index)[0]
        return accuracy(
            lambda x: self.net.forward_current(x, task.index),
            split,
            self.stream,
            self.hw,
            self.cfg.eval_batch_size,
            task.index,
        )

    def snapshot(self) -> SharedNet:
        """A copy of the whole network, to restart a task from (CPG's growth restarts from the last task)."""
        return copy.deepcopy(self.net)

    def shares(self, tag: int) -> dict:
        """Owned share of task `tag`, free share and width multiplier, for tasks.parquet."""
        counts = self.net.owner_counts().double()
        total = counts.sum()
        return {
            "owned_share": float(counts[tag] / total),
            "free_share": float(counts[0] / total),
            "width_multiplier": self.net.multiplier,
        }

    # ---- the Method interface ----------------------------------------------------------
    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.net.predict(x, task)

    def embed(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.net.embed(x, task)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "extra": self.net.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load(state["net"], state["extra"])
        self.net = self.hw.prepare_model(self.net)  # memory format for tensors rebuilt at a grown width

    def footprint(self) -> Footprint:
        params, size = self.net.storage()
        base = self.net.base_params + sum(p.numel() for p in self.net.heads.heads[0].parameters())
        return Footprint(params=params, bytes=size, base_params=base)

    def summary(self) -> dict:
        """Redundancy (share of free weights) and the final width multiplier."""
        counts = self.net.owner_counts().double()
        return {"redundancy": float(counts[0] / counts.sum()), "width_multiplier": self.net.multiplier}
