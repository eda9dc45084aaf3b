"""The base of the weight-sharing methods (PackNet, Piggyback, PAE, CPG): one `SharedNet`, per-task views.

A subclass's `learn` composes the phases offered here (train, prune, grow,
retrain) into its recipe. Prediction, persistence and storage accounting are
shared: task k always predicts through its own view of the shared weights, so
its logits never change after it is learned.
"""

import copy

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clrun.data.stream import Split, Task
from clrun.methods.base import Footprint, Method
from clrun.models import build_backbone
from clrun.models.sharing import SharedNet
from clrun.train import accuracy, fit


class WeightSharingMethod(Method):
    """Holds the `SharedNet` and the phases weight-sharing recipes are made of."""

    picking = False  # whether tasks learn a picking mask over earlier tasks' weights

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        views = OmegaConf.merge(backbone_cfg, {"pretrained": None})  # pretrained weights load once, below

        def build(channels: float):
            return build_backbone(OmegaConf.merge(views, {"width": backbone_cfg.width * channels}), stream.input_shape)

        self.net = SharedNet(build)
        if backbone_cfg.pretrained:
            self.net.backbone.load_state_dict(build_backbone(backbone_cfg, stream.input_shape).state_dict())
        self.net = self.hw.prepare_model(self.net)

    # ---- phases ------------------------------------------------------------------------
    def add_head(self, task: Task) -> int:
        """A head for `task` at the current width."""
        head = self.net.heads.add(self.net.backbone.out_features, task.n_classes)
        self.net.heads.heads[head].to(self.net.device)
        return head

    def train_phase(self, task: Task, cfg, progress, label: str, mask_cfg=None, train_weights: bool = True) -> dict:
        """Train the current task: its own shared weights (if `train_weights`), its private tensors and head,
        and its picking masks under `mask_cfg` when given. Weight decay goes to its own weights only."""
        head = task.index
        params = list(self.net.private_parameters()) + list(self.net.heads.heads[head].parameters())
        if train_weights:
            params += self.net.shared_weights()
        extra = [(self.net.picks(), mask_cfg)] if mask_cfg is not None and self.net.picks() else []
        no_decay = OmegaConf.merge(cfg, {"weight_decay": 0.0})

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.net.forward_current(x, head), y)

        stats = fit(
            self.net,
            params,
            loss,
            (task.train.x, task.train.y),
            no_decay,
            self.stream,
            self.hw,
            progress,
            f"task {task.index} {task.name}: {label}",
            extra_groups=extra,
            after_backward=lambda: self.net.decay_own_weights(cfg.weight_decay if train_weights else 0.0),
        )
        return stats.row()

    def current_accuracy(self, task: Task, split: Split) -> float:
        """Accuracy of the task being learned (live masks), e.g. to compare with its goal."""
        self.net.eval()
        return accuracy(
            lambda x: self.net.forward_current(x, task.index), split, self.stream, self.hw, self.cfg.eval_batch_size
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

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "extra": self.net.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load(state["net"], state["extra"])

    def footprint(self) -> Footprint:
        params, size = self.net.storage()
        base = self.net.base_params + sum(p.numel() for p in self.net.heads.heads[0].parameters())
        return Footprint(params=params, bytes=size, base_params=base)

    def summary(self) -> dict:
        """Redundancy (share of free weights) and the final width multiplier."""
        counts = self.net.owner_counts().double()
        return {"redundancy": float(counts[0] / counts.sum()), "width_multiplier": self.net.multiplier}
