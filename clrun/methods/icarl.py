"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017), class-incremental.

Followed: van de Ven's iCaRL (GMvandeVen/continual-learning, the 2019 "three scenarios" code: `_compare.py`'s
iCaRL row sets `--bce --bce-distill --add-exemplars --use-exemplars --herding --norm-exemplars`; `encoder.py`
`train_a_batch`, `train.py` `train_cl`, `exemplars.py`) for the vdv presets (conf/tuning/icarl_vdv_*), and
Mammoth's (aimagelab/mammoth `models/icarl.py`) for the defaults. Both do the following, and so does this:

- Training set of a task: its images plus every stored exemplar (one shuffled set: vdV's `ConcatDataset`,
  Mammoth's `icarl_replay`), global labels; the network has one sigmoid output per class seen so far.
- Loss: binary cross-entropy of every output seen so far; the target of a new class is the one-hot label, the target
  of an old class (learned in an earlier task) is the previous model's sigmoid output on the same (augmented)
  image, sigmoid(old logit / `temperature`) (distillation; the previous model is a frozen copy taken before the
  task). `reduction`: `mean` over batch and classes (Mammoth: `binary_cross_entropy_with_logits`' default) or
  `summed` over classes and averaged over the batch (van de Ven). `temperature`: 1 (Mammoth), 2 in the vdv
  presets (van de Ven divides by `KD_temp`, `--temp` 2).
- After the task, the exemplar memory (`replay.budget` images shared by every class seen, per class
  m = budget / classes; earlier classes keep their first-ranked exemplars) takes each new class's exemplars by
  iCaRL's herding on the L2-normalised features of the new network (`clrun.methods.parts.replay.herding`).
- Classification by the nearest mean of exemplars: each class's mean of the L2-normalised features of its
  exemplars, itself normalised (the paper's and van de Ven's `norm_exemplars`), computed once after the task;
  an image's score for a class is minus the squared distance of its normalised features to the mean.
  `nme: false` classifies with the network's outputs instead. `flip_means`: each mean also averages the
  horizontally flipped exemplars (iCaRL's CIFAR code; off by default).

Departures: the memory's per-class quota is budget // classes with the remainder given to the first classes (the
whole budget is used; both references floor); herding ranks by the normalised features and their mean, not
re-normalised (van de Ven normalises the mean; Mammoth's current code does not normalise at all, neither in herding
nor in its class means, where this follows the paper); every task starts a fresh optimizer (van de Ven's default
`adam` keeps one for the run). `replay.batch_size` has no use here (exemplars join the training set).

Scenarios: class (iCaRL's own, van de Ven's only). Task: trained the same way over every class seen (Mammoth's
`task-il`); a task's prediction is the nearest mean among its own classes. Domain is refused: its tasks share
labels, so there are no new classes to add outputs for (van de Ven: "BCE-distill can only be used for
class-incremental learning").
"""

import copy
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F

from clrun.config import POSITIVE, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import MethodConfig
from clrun.methods.parts.replay import ReplayConfig, Replaying, ReplayPolicy
from clrun.models import TaskModel
from clrun.results import Footprint, tensor_bytes
from clrun.train import Loss


class Reduction(Enum):
    """How the binary cross-entropy of a batch is reduced (`reduction`)."""

    mean = "mean"  # over the batch and the classes (Mammoth)
    summed = "summed"  # summed over the classes, averaged over the batch (van de Ven)


@dataclass
class ICaRLConfig(MethodConfig):
    """iCaRL (Rebuffi et al. 2017): herding exemplars, sigmoid outputs with distillation, nearest-mean-of-exemplars."""

    # the exemplar memory: budget shared by every class seen (iCaRL's K = 2000), picked by herding (`class_balanced`:
    # at random, van de Ven's iCaRL without --herding)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=2000, policy=ReplayPolicy.herding))
    temperature: float = checked(POSITIVE, 1.0)  # old classes' targets sigmoid(old logit / T) (Mammoth 1, vdV 2)
    reduction: Reduction = Reduction.mean
    nme: bool = True  # classify by the nearest mean of exemplars (false: by the network's outputs)
    flip_means: bool = False  # class means also average the horizontally flipped exemplars (iCaRL's CIFAR code)


def icarl_targets(y: torch.Tensor, n_classes: int, old_logits: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """The binary targets of a batch with global labels `y` over `n_classes` outputs: one-hot, the first
    old_logits.shape[1] (old) classes replaced by the previous model's sigmoid(old_logits / temperature)."""
    targets = F.one_hot(y, n_classes).float()
    if old_logits is not None:
        targets[:, : old_logits.shape[1]] = torch.sigmoid(old_logits.float() / temperature)
    return targets


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, D): per class, the mean of its rows' L2-normalised features, normalised; NaN for a class
    without rows."""
    rows = F.normalize(features.float(), dim=1)
    means = torch.full((n_classes, rows.shape[1]), torch.nan, device=rows.device)
    for label in labels.unique().tolist():
        means[label] = rows[labels == label].mean(0)
    return F.normalize(means, dim=1)


def nearest_mean_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance of each row's L2-normalised features to each class mean (-inf for a class
    without exemplars): the argmax is the nearest mean of exemplars."""
    rows = F.normalize(features.float(), dim=1)
    distances = torch.cdist(rows, means.nan_to_num(0.0)).pow(2)
    return torch.where(torch.isnan(means[:, 0])[None, :], -torch.inf, -distances)


class ICaRL(Replaying):
    config_class = ICaRLConfig
    predicts_before_learning = False

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if cfg.replay.budget < 1 or cfg.replay.policy is ReplayPolicy.reservoir:
            raise ClrunError(
                "method icarl needs exemplars of every class: method.replay.budget >= 1 and replay.policy herding "
                f"or class_balanced (got budget {cfg.replay.budget}, policy {cfg.replay.policy.value})"
            )
        self.model = self.new_model([], "class")  # one output per class seen, in the task scenario too
        self.means = torch.zeros(0, self.model.backbone.out_features, device=hw.device)

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class")

    def global_labels(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Labels over every class of the stream from labels local to their tasks `t`."""
        offsets = torch.tensor([self.stream.class_offset(k) for k in range(len(self.stream))], device=y.device)
        return y + offsets[t]

    def make_teacher(self) -> TaskModel:
        """A frozen copy of the current model, in eval mode."""
        teacher = copy.deepcopy(self.model).eval()
        teacher.requires_grad_(False)
        return teacher

    def icarl_loss(self, teacher: TaskModel | None) -> Loss:
        """A `fit` loss on batches with global labels: binary cross-entropy of every class seen against
        `icarl_targets` (the old classes' targets from `teacher` on the same images; none before the first task)."""
        model, temperature, summed = self.model, self.cfg.temperature, self.cfg.reduction is Reduction.summed

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            logits = model(x, None).float()
            old = None
            if teacher is not None:
                with torch.no_grad():
                    old = teacher(x, None)
            targets = icarl_targets(y, logits.shape[1], old, temperature)
            terms = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            return terms.sum(1).mean() if summed else terms.mean()

        return loss

    def learn(self, task: Task) -> dict:
        teacher = self.make_teacher() if task.index else None
        self.model.add_head(task.n_classes)
        x, y = task.train.x, task.train.y + self.stream.class_offset(task.index)
        if len(self.memory):
            x = torch.cat([self.memory.x.to(x.device), x])
            y = torch.cat([self.global_labels(self.memory.y, self.memory.t).to(y.device), y])
        stats = self.fit(
            task, self.model, self.model.parameters(), self.icarl_loss(teacher), data=(x, y), mixed=len(self.memory) > 0
        )
        self.remember(task)
        self.means = self.exemplar_means()
        return {**stats.row(), "exemplars": len(self.memory)}

    @torch.no_grad()
    def exemplar_means(self) -> torch.Tensor:
        """Every seen class's nearest-mean-of-exemplars prototype under the current network (`class_means`; with
        `flip_means`, the normalised sum of the means of the exemplars and of their mirror images)."""
        features = self.image_features(self.memory.x)
        labels = self.global_labels(self.memory.y, self.memory.t)
        n_classes = self.stream.class_offset(len(self.model.heads.heads))
        means = class_means(features, labels, n_classes)
        if self.cfg.flip_means:
            flipped = class_means(self.image_features(self.memory.x.flip(-1)), labels, n_classes)
            means = F.normalize(means + flipped, dim=1)
        return means

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of prepared images over every class seen: nearest mean of exemplars, or the network's logits."""
        self.model.eval()
        features = self.model.features(x)
        if not self.cfg.nme:
            return self.model.logits(features, None)
        return nearest_mean_scores(features, self.means)

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        offset = self.stream.class_offset(task)
        return self.scores(x)[:, offset : offset + self.stream.tasks[task].n_classes]

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        return self.scores(x), None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "means": self.means}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]], "class")
        self.model.load_state_dict(state["model"])
        self.memory.load_state_dict(state["memory"], self.hw.device)
        self.means = state["means"].to(self.hw.device)

    def footprint(self) -> Footprint:
        """The network, the exemplars (images, labels, tasks) and the class means (bytes)."""
        return super().footprint().plus(tensor_bytes([self.means]))
