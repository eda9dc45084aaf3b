"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), in every scenario.

Before each new task the model is copied into a frozen teacher (eval mode, no
gradients). On every training batch the teacher runs on the same (augmented)
images as the student, and the student is trained on

    CE(current task) + lambda * KD,   KD(s, t) = -sum_c softmax(t / T)_c log softmax(s / T)_c

(cross-entropy against the teacher's soft targets, averaged over the batch, no
T^2 factor: Li & Hoiem's L_old and van de Ven's 2022 `loss_fn_kd` in GMvandeVen/continual-learning).
`kd_form: vdv2019` is the form of that repository's 2019 code (utils.py `loss_fn_kd` at e17b714, behind
the three-scenario MNIST tables): T^2 times the mean over the batch *and the classes*, i.e. the sum form
times T^2 / (number of classes).

- task: one KD term per earlier head, each with its own softmax, summed (Li & Hoiem's
  sum over old tasks; van de Ven 2022's `L_cur + (t-1) mean_j KD_j` is the same sum).
  Every parameter trains, earlier heads included: they are what LwF distils into
  (the paper optimises theta_s, theta_o and theta_n jointly).
- class: CE over every class seen so far for the current data; KD (`kd_over_seen`, the
  default: van de Ven's code, behind the published numbers) of the teacher's probabilities,
  padded with zeros for the new classes, against the student's softmax over every class
  seen so far (it also pushes the new classes down on the current data). With
  `kd_over_seen=false`: both softmaxes over the old classes only (Li & Hoiem's old outputs).
- domain: KD of the shared head, weight lambda (van de Ven 2022 weighs it by t-1).

`weight_by_tasks`: (1/t) CE + (1 - 1/t) lambda KD with t = task + 1, as van de Ven's 2019 code
(the MNIST tables the vdv presets compare with; its KD may also carry a T^2 factor, unverified here).

`one_optimizer`: the optimizer's state goes on from task to task (van de Ven's code builds one optimizer for the
whole run); by default each task starts a fresh one.

`warmup_epochs`: first train only the new head with the backbone and earlier heads
frozen (the paper's warm-up; off by default as in FACIL). In the domain scenario
that is the shared head.

`replay` (budget > 0): a replay memory as in `er`; the current batch's whole LwF
loss is mixed with the replayed batch's cross-entropy, (1/t) current + (1 - 1/t) replay.
The teacher is re-created from the stored model before each task, so the footprint
is the model plus the memory.
"""

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clrun.config import NON_NEGATIVE, POSITIVE, checked
from clrun.data.stream import Task
from clrun.methods.base import MethodConfig
from clrun.methods.parts.distill import KDForm, distillation
from clrun.methods.parts.replay import ReplayConfig, Replaying
from clrun.models import TaskModel
from clrun.train import FitStats, Loss


@dataclass
class LwFConfig(MethodConfig):
    """Learning without forgetting (Li & Hoiem 2016): distil a frozen copy's outputs on the new data."""

    temperature: float = checked(POSITIVE, 2.0)  # KD temperature T (Li & Hoiem, FACIL, van de Ven: 2)
    lwf_lambda: float = checked(NON_NEGATIVE, 1.0)  # weight of the distillation loss (Li & Hoiem's lambda_o, FACIL: 1)
    # first train only the new head for this many epochs (the paper's warm-up; 0: off)
    warmup_epochs: int = checked(NON_NEGATIVE, 0)
    # class scenario: the student's softmax spans every class seen so far, the teacher's probabilities zero-padded for
    # the new classes (van de Ven's code, behind the published numbers); false: both softmaxes span the old classes
    # only (Li & Hoiem's old outputs)
    kd_over_seen: bool = True
    # false: CE + lambda KD (Li & Hoiem; van de Ven 2022); true: (1/t) CE + (1 - 1/t) lambda KD, t the tasks so far
    # (van de Ven's 2019 code, behind the MNIST tables the vdv presets compare with)
    weight_by_tasks: bool = False
    kd_form: KDForm = KDForm.summed
    # one optimizer for the whole run: its state (Adam's moments, step count) goes on from task to task, as in van de
    # Ven's code; false: a fresh optimizer per task
    one_optimizer: bool = False
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # budget 0: no replay


class LwF(Replaying):
    config_class = LwFConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.carry: dict = {}  # with `one_optimizer`: each parameter's optimizer state, kept across tasks

    def make_teacher(self) -> TaskModel:
        """A frozen copy of the current model, in eval mode."""
        teacher = copy.deepcopy(self.model).eval()
        teacher.requires_grad_(False)
        return teacher

    def lwf_loss(self, task: int, teacher: TaskModel | None) -> Loss:
        """A `fit` loss on task `task`'s batches: cross-entropy under the scenario plus lambda times the
        distillation of `teacher`'s outputs on the same images (none when `teacher` is None)."""
        model, scenario, temperature = self.model, self.model.scenario, self.cfg.temperature
        offset = self.stream.class_offset(task)

        def distil(student: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
            return distillation(student, teacher_logits, temperature, self.cfg.kd_form)

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            features = model.features(x)
            if scenario == "task":
                ce = F.cross_entropy(model.logits(features, task), y)
            else:
                logits = model.logits(features, None)
                ce = F.cross_entropy(logits, self.stream.targets(y, task))
            if teacher is None:
                return ce
            with torch.no_grad():
                old = teacher.features(x)
            if scenario == "task":
                kd = sum(distil(model.logits(features, j), teacher.logits(old, j)) for j in range(task))
            elif scenario == "class" and self.cfg.kd_over_seen:  # probability 0 for the new classes
                padded = F.pad(teacher.logits(old, None), (0, logits.shape[1] - offset), value=-torch.inf)
                kd = distil(logits, padded)
            elif scenario == "class":
                kd = distil(logits[:, :offset], teacher.logits(old, None))
            else:
                kd = distil(logits, teacher.logits(old, None))
            if self.cfg.weight_by_tasks:
                return (ce + task * self.cfg.lwf_lambda * kd) / (task + 1)
            return ce + self.cfg.lwf_lambda * kd

        return loss

    def learn(self, task: Task) -> dict:
        teacher = self.make_teacher() if task.index else None
        head = self.model.add_head(task.n_classes)
        loss = self.replayed(self.lwf_loss(task.index, teacher), task.index)
        stats = []
        if teacher is not None and self.cfg.warmup_epochs:
            # the new head alone, the backbone and earlier heads frozen (eval mode: batch-norm statistics too)
            new_head = self.model.heads.heads[head]
            self.model.eval()
            warmup = OmegaConf.merge(self.cfg.train, {"epochs": self.cfg.warmup_epochs, "iterations": None})
            stats.append(self.fit(task, new_head, new_head.parameters(), loss, warmup, "warm-up"))
        carry = self.carry if self.cfg.one_optimizer else None
        stats.append(self.fit(task, self.model, self.model.parameters(), loss, carry=carry))
        self.remember(task)
        return FitStats.total(stats).row()

    def state_dict(self) -> dict:
        names = {p: name for name, p in self.model.named_parameters()}
        carried = {names[p]: state for p, state in self.carry.items() if p in names}
        return {**super().state_dict(), "optimizer_state": carried}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        params = dict(self.model.named_parameters())
        self.carry = {params[name]: s for name, s in state.get("optimizer_state", {}).items()}
