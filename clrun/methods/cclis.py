"""CCLIS: Contrastive Continual Learning with Importance Sampling and Prototype-instance Relation Distillation
(Li, Hu et al., AAAI 2024), built on Co2L (Cha, Lee, Shin, ICCV 2021). Class-incremental.

Followed: the authors' code, lijy373/CCLIS (`CCLIS/main.py`, `losses_negative_IS.py`, `networks/resnet.py`,
`main_linear_buffer.py` + `main_ce_buffer.py`, `util.py`; `cifar10_200.sh` for the values). What it does, and this:

- Network: the backbone, a projection head (Linear d-d, ReLU, Linear d-`feat_dim` 128; features L2-normalised)
  and one prototype per class of the stream (a bias-free Linear feat_dim -> classes, its rows L2-normalised before
  every step). The network's output is the prototypes' similarity to every image, (classes, batch).
- Stage 1, per task: the task's images plus the replay buffer in one shuffled set (the code's `BatchSchedulerSampler`
  fixes each batch's buffer share at round(batch * |M| / (|M| + |D|)); here it is that share in expectation),
  each image with its importance weight (current images 1 / class size; buffer images their stored weight).
  Loss `is_supcon_loss` (`ISSupConLoss.forward`): anchors are the prototypes of the classes in the batch, contrasted
  against every image at temperature `temp` (0.5); a negative pair whose prototype and image both belong to earlier
  tasks has its exp divided by the image's weight times its class's count in the batch (importance sampling: the
  buffer's sum of negatives then estimates the full old data's). `anchors: current` keeps only the current task's
  prototypes as anchors (Co2L's asymmetric form; off in the code). Plus, from the second task,
  `distill_power` (0.6) x PRD (`prd_loss`): per image, the softmax over the earlier classes' prototypes of the
  similarities, the old model's at `past_temp` (0.1) the target of the new one's at `current_temp` (0.2)
  (cross-entropy, averaged over the batch's images). The old model is a frozen copy taken when the task starts.
- Importance scores (`score_computing`, `score_calculate`), after the task, of every buffer and current image: in
  eval mode, `score_passes` (5) augmented passes; per pass, exp(similarity / temp) to each seen class's prototype,
  normalised per prototype over all candidates; averaged over the passes and summed over the prototypes, divided by
  (classes seen - 1) (`importance_scores`, with the code's accumulation: an image's own-class entry keeps the last
  pass only).
- Buffer (`set_replay_samples`, `importance_select`): after task k (k+1 tasks seen) each earlier class keeps
  (k / (k+1)) budget / classes images (randomly rounded), drawn without replacement in proportion to their scores
  from what it held; then each new class takes an equal share of what is left (randomly rounded), drawn from all its
  images the same way. An image's weight is its score over the sum of its class's candidates' scores.
- Stage 2, for evaluation after each task (`main_linear_buffer.py`): a fresh linear classifier on the frozen
  backbone's features (not the projection), trained on the buffer as it was during the task plus the task's images,
  class-balanced (the code's `WeightedRandomSampler`, weights 1 / class count; here one such draw of the set's size
  per phase), recipe `linear` (SGD lr 0.05, momentum 0.9, 100 epochs, x0.2 at 60, 75, 90; batch 256).

Augmentation: the code's views are torchvision's RandomResizedCrop (scale 0.2-1), flip, colour jitter, grayscale,
on PIL images, one view per image (its `TwoCropTransform` is imported but unused; Co2L uses two: `views: 2`). Here the
method augments the stream's (normalised) batch itself with a RandomResizedCrop (`crop_scale`, torchvision's box
rules from `clrun.data.augment`, resampled by one bilinear `grid_sample` per batch, not antialiased) and a horizontal
flip (`flip`); no colour jitter or grayscale (MNIST is grey). Scores and the linear classifier see augmented images
too, as in the code.

Departures: every task trains `train` (the code gives the first task `--start_epoch` 500 epochs, later ones 100,
with a 10-epoch warm-up at batch 512 and cosine to lr x 0.001); the code finds "earlier task" pairs by comparing
label // cls_per_task with `target_labels[-1] // 2` (right for 2 classes per task only); here: label < the task's
first class;
random rounding draws from torch's RNG (the code: Python's `random`); an earlier class's quota is capped so that
the buffer never exceeds the budget (the code can overshoot it when the classes outnumber the budget's share).
Scenarios: class (the paper's); task: the same training, each task's prediction the classifier restricted to its
classes (the code's task-IL figure). Domain is refused.
"""

import copy
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, checked
from clrun.data import augment
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import MethodConfig
from clrun.methods.parts.replay import ImportanceMemory, ReplayConfig, Replaying, ReplayPolicy
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import Optimizer, OptimizerConfig, Schedule, TrainConfig


class Anchors(Enum):
    all = "all"  # the prototypes of every class in the batch (the CCLIS code)
    current = "current"  # the current task's classes only (Co2L's asymmetric form)


@dataclass
class CCLISConfig(MethodConfig):
    """CCLIS (Li, Hu et al. 2024): prototype contrastive loss with importance-sampled replay, PRD, linear eval."""

    # the buffer: budget images (the code's --mem_size), per-class quotas, picked by importance sampling
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=200))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            optimizer=Optimizer.sgd,
            lr=1.0,
            momentum=0.9,
            weight_decay=1e-4,
            schedule=Schedule.cosine,
            epochs=100,
            batch_size=512,
        )
    )
    # the prototypes' optimizer (the code's --learning_rate_prototypes 0.01, the encoder's schedule)
    prototypes: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            optimizer=Optimizer.sgd, lr=0.01, momentum=0.9, weight_decay=1e-4, schedule=Schedule.cosine
        )
    )
    # stage 2: the linear classifier on the frozen backbone (main_linear_buffer.py with cifar10_200.sh's lr)
    linear: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            optimizer=Optimizer.sgd,
            lr=0.05,
            momentum=0.9,
            schedule=Schedule.multistep,
            milestones=[60, 75, 90],
            gamma=0.2,
            epochs=100,
            batch_size=256,
        )
    )
    temp: float = checked(POSITIVE, 0.5)  # the IS-SupCon and score temperature (--temp)
    current_temp: float = checked(POSITIVE, 0.2)  # PRD: the new model's temperature
    past_temp: float = checked(POSITIVE, 0.1)  # PRD: the old model's temperature
    distill_power: float = checked(NON_NEGATIVE, 0.6)  # PRD's weight
    feat_dim: int = checked(AT_LEAST_1, 128)  # the projection's output
    score_passes: int = checked(AT_LEAST_1, 5)  # augmented passes averaged in the importance scores (--max_iter)
    views: int = checked(AT_LEAST_1, 1)  # augmented views per image per step (the code: 1; Co2L: 2)
    anchors: Anchors = Anchors.all
    augment: bool = True  # the method's RandomResizedCrop + flip on every training, scoring and linear batch
    crop_scale: float = checked(FRACTION, 0.2)  # RandomResizedCrop's smallest area share
    flip: bool = True


def augmented(x: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    """A RandomResizedCrop of each image (torchvision's box rules, area share in [scale, 1]) back to its size, and a
    horizontal flip with probability 1/2, as one bilinear `grid_sample` of the batch (torch's RNG on x's device)."""
    n, _, height, width = x.shape
    top, left, h, w = augment.resized_crop_boxes(n, height, width, (scale, 1.0), device=x.device)
    sign = torch.ones(n, dtype=torch.float64, device=x.device)
    if flip:
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def is_supcon_loss(
    output: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    first_current: int,
    temperature: float,
    anchors: str = "all",
) -> torch.Tensor:
    """The importance-sampled prototype SupCon loss (`ISSupConLoss.forward`) of `output` (classes, batch): the
    prototypes' similarity to each image, `labels` global, `weights` each image's importance weight, classes below
    `first_current` from earlier tasks. Anchors: the prototypes of the classes in the batch (`current`: of those
    >= first_current). For anchor a and image j: log p = s_aj / T - log sum_k exp(s_ak / T) / c_ak, where c_ak =
    weights_k x (images of k's class in the batch) if a and k are both earlier classes and k is not of a's class,
    else 1; the loss is minus the mean of log p over the (anchor, image of its class) pairs."""
    present = labels.unique()
    if anchors == "current":
        present = present[present >= first_current]
    mask = (present[:, None] == labels[None, :]).double()
    logits = output[present].double() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    count = (labels[:, None] == labels[None, :]).sum(0).double()  # images of each image's class in the batch
    weight = weights.double() * count
    earlier = (present[:, None] < first_current) & (labels[None, :] < first_current)
    corrected = logits - torch.log(weight)[None, :] * (earlier.double() * (1 - mask))
    log_prob = logits - torch.logsumexp(corrected, 1, keepdim=True)
    return -(log_prob * mask).sum() / mask.sum()


def prd_loss(student: torch.Tensor, teacher: torch.Tensor, n_old: int, current_temp: float, past_temp: float):
    """Prototype-instance relation distillation (main.py, `distill_type == 'PRD'`): per image (column), the
    softmax over the first `n_old` prototypes of the similarities, the teacher's at `past_temp` the target of the
    student's at `current_temp`; cross-entropy summed over prototypes, averaged over the images."""
    log_p = F.log_softmax(student[:n_old].float() / current_temp, dim=0)
    target = F.softmax(teacher[:n_old].float() / past_temp, dim=0)
    return -(target * log_p).sum(0).mean()


def importance_scores(passes: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Each candidate's score (`score_computing`) from per-pass (classes, N) matrices exp(similarity / T): each row
    normalised over the N candidates, averaged over the passes (an image's own-class entry: the last pass's over
    the number of passes, as the code's accumulation leaves it), summed over the rows, over (classes - 1)."""
    n_classes = passes[0].shape[0]
    own = F.one_hot(labels, n_classes).T.bool()
    total = torch.zeros_like(passes[0], dtype=torch.float64)
    for scores in passes:
        scores = scores.double()
        total = total.masked_fill(own, 0.0) + scores / scores.sum(1, keepdim=True)
    return (total / len(passes)).sum(0) / max(n_classes - 1, 1)


def _rounded(size: float) -> int:
    """`size` rounded up with probability its fractional part, else down (torch's RNG)."""
    low = int(size // 1)
    return low + int(torch.rand(()).item() < size - low)


def importance_select(
    old_scores: torch.Tensor,
    old_labels: torch.Tensor,
    new_scores: torch.Tensor,
    new_labels: torch.Tensor,
    budget: int,
    tasks_seen: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The buffer after `tasks_seen` tasks (`set_replay_samples`): indices kept among the held (old) candidates and
    among the new task's, with their importance weights (score / the class's candidates' score sum). Each earlier
    class keeps (tasks_seen - 1) / tasks_seen x budget / (earlier classes), randomly rounded (capped by what it holds
    and by the budget); each new class an equal share of what is left, randomly rounded; picks drawn without
    replacement in proportion to the scores (torch.multinomial)."""
    picks = []
    kept = 0
    for scores, labels, shrink in ((old_scores, old_labels, True), (new_scores, new_labels, False)):
        index, weight = [], []
        classes = labels.unique().tolist()
        for k, label in enumerate(classes):
            rows = torch.nonzero(labels == label).squeeze(1)
            if shrink:
                size = _rounded((tasks_seen - 1) * budget / tasks_seen / len(classes))
            else:
                size = _rounded((budget - kept) / (len(classes) - k))
            size = max(0, min(size, len(rows), budget - kept))
            class_scores = scores[rows].double()
            chosen = torch.multinomial(class_scores, size, replacement=False) if size else rows[:0]
            index.append(rows[chosen])
            weight.append((class_scores / class_scores.sum())[chosen])
            kept += size
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        picks.append(torch.cat(index) if index else empty)
        picks.append(torch.cat(weight) if weight else empty.double())
    return picks[0], picks[1], picks[2], picks[3]


class ProtoNet(nn.Module):
    """The backbone, the projection head and the prototypes: forward gives the normalised projections and the
    prototypes' similarities to them, (classes, batch)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, n_classes: int):
        super().__init__()
        d = backbone.out_features
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, feat_dim))
        self.prototypes = nn.Linear(feat_dim, n_classes, bias=False)

    @torch.no_grad()
    def normalise_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(self.head(self.backbone(x)), dim=1)
        return features, self.prototypes(features).T


class CCLIS(Replaying):
    config_class = CCLISConfig
    predicts_before_learning = False
    starts_head_from_classifier = False

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if cfg.replay.budget < 1 or cfg.replay.policy is not ReplayPolicy.class_balanced:
            raise ClrunError(
                "method cclis needs its importance-sampled buffer: method.replay.budget >= 1 and replay.policy "
                f"class_balanced (got budget {cfg.replay.budget}, policy {cfg.replay.policy.value})"
            )
        self.memory = ImportanceMemory(cfg.replay.budget)
        self.model = self.new_model([], "class")  # backbone + the linear classifier (one growing head)
        self.n_classes = stream.class_offset(len(stream))
        self.net = ProtoNet(self.model.backbone, cfg.feat_dim, self.n_classes).to(hw.device)

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class")

    def global_labels(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor([self.stream.class_offset(k) for k in range(len(self.stream))], device=y.device)
        return y + offsets[t.to(y.device)]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        return augmented(x, self.cfg.crop_scale, self.cfg.flip) if self.cfg.augment else x

    def contrastive_loss(self, first: int, teacher: ProtoNet | None):
        cfg, net = self.cfg, self.net

        def loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, step) -> torch.Tensor:
            net.normalise_prototypes()
            x = torch.cat([self.view(x) for _ in range(cfg.views)])
            y, w = y.repeat(cfg.views), w.repeat(cfg.views)
            _, output = net(x)
            value = is_supcon_loss(output, y, w, first, cfg.temp, cfg.anchors.value)
            if teacher is not None and first:
                with torch.no_grad():
                    _, old = teacher(x)
                value = value + cfg.distill_power * prd_loss(output, old, first, cfg.current_temp, cfg.past_temp)
            return value.float()

        return loss

    def candidates(self, task: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffer's images then the task's, with global labels and tasks."""
        x, t = task.train.x, torch.full_like(task.train.y, task.index)
        y = task.train.y + self.stream.class_offset(task.index)
        if len(self.memory):
            x = torch.cat([self.memory.x.to(x.device), x])
            y = torch.cat([self.global_labels(self.memory.y, self.memory.t).to(y.device), y])
            t = torch.cat([self.memory.t.to(t.device), t])
        return x, y, t

    def learn(self, task: Task) -> dict:
        first = self.stream.class_offset(task.index)
        teacher = None
        if task.index:
            teacher = copy.deepcopy(self.net).eval()
            teacher.requires_grad_(False)
        self.model.add_head(task.n_classes)
        x, y, t = self.candidates(task)
        counts = torch.bincount(task.train.y, minlength=task.n_classes).double()
        w = torch.cat(
            [
                self.memory.w.to(y.device) if len(self.memory) else y.new_zeros(0).float(),
                (1 / counts[task.train.y]).float().to(y.device),
            ]
        )
        encoder = [p for name, p in self.net.named_parameters() if not name.startswith("prototypes")]
        groups = [(list(self.net.prototypes.parameters()), self.cfg.prototypes)]
        mixed = len(self.memory) > 0
        stats = [
            self.fit(
                task,
                self.net,
                encoder,
                self.contrastive_loss(first, teacher),
                data=(x, y, w),
                groups=groups,
                mixed=mixed,
                phase="contrastive",
            )
        ]
        stats.append(self.fit_linear(task, x, y, mixed))
        self.update_memory(task, x, y, t)
        return {**stats[0].total(stats).row(), "buffer": len(self.memory)}

    def fit_linear(self, task: Task, x: torch.Tensor, y: torch.Tensor, mixed: bool):
        """A fresh linear classifier over the classes seen on the frozen backbone, class-balanced."""
        for head in self.model.heads.heads:
            head.reset_parameters()
        weights = 1 / torch.bincount(y).double()[y]
        order = torch.multinomial(weights.cpu(), len(y), replacement=True).to(y.device)
        model = self.model

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            model.backbone.eval()
            with torch.no_grad():
                features = model.features(self.view(x))
            return F.cross_entropy(model.logits(features, None), y)

        return self.fit(
            task,
            self.model.heads,
            self.model.heads.parameters(),
            loss,
            recipe=self.cfg.linear,
            data=(x[order], y[order]),
            mixed=mixed,
            phase="linear",
        )

    @torch.no_grad()
    def update_memory(self, task: Task, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Score every candidate (`importance_scores`) and resample the buffer (`importance_select`)."""
        self.net.eval()
        seen = self.stream.class_offset(task.index) + task.n_classes
        passes = []
        for _ in range(self.cfg.score_passes):
            rows = []
            for start in range(0, len(y), self.cfg.eval_batch_size):
                batch = x[start : start + self.cfg.eval_batch_size].to(self.hw.device)
                tasks = t[start : start + self.cfg.eval_batch_size]
                inputs = self.hw.to_input(self.stream.prepare(batch, train=False, task=tasks))
                rows.append(self.net(self.view(inputs))[1][:seen].float())
            passes.append(torch.exp(torch.cat(rows, 1) / self.cfg.temp))
        scores = importance_scores(passes, y.to(passes[0].device)).to(y.device)
        held = len(self.memory)
        old, old_w, new, new_w = importance_select(
            scores[:held], y[:held], scores[held:], y[held:], self.cfg.replay.budget, task.index + 1
        )
        index = torch.cat([old, new + held])
        local = y[index] - torch.tensor([self.stream.class_offset(k) for k in t[index].tolist()], device=y.device)
        self.memory.replace(x[index], local, t[index], torch.cat([old_w, new_w]))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x, None)

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        offset = self.stream.class_offset(task)
        return self.scores(x)[:, offset : offset + self.stream.tasks[task].n_classes]

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        return self.scores(x), None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]], "class")
        self.model.load_state_dict(state["model"])
        self.net = ProtoNet(self.model.backbone, self.cfg.feat_dim, self.n_classes).to(self.hw.device)
        self.net.load_state_dict(state["net"])
        self.memory.load_state_dict(state["memory"], self.hw.device)

    def footprint(self) -> Footprint:
        """The backbone, the linear classifier, the projection head, the prototypes and the buffer (images,
        labels, tasks, weights)."""
        extra = [self.net.head, self.net.prototypes]
        base = super().footprint()
        params = base.params + sum(count_params(m) for m in extra)
        return Footprint(params, base.bytes + sum(module_bytes(m) for m in extra), base.base_params)
