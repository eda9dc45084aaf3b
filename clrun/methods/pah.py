"""PAH: prototype-augmented hypernetworks (De La Fuente et al., CVPR-W 2025; pah2025/PAH).

Each task k has learnable class prototypes p_1^k .. p_C^k (prototype_channels x s x s maps); its
embedding e_k is their concatenation, and one hypernetwork turns e_k into the weights of a
bias-free linear head D -> C on a shared backbone. Learning task k (teacher = frozen copy of the
whole model taken before task k, eval mode):

- main step (backbone, hypernetwork, every prototype): L_hm + lambda_sm L_sm, with L_hm the
  cross-entropy of task k's generated head and L_sm the distillation of every earlier task's
  generated head on the current images;
- then a prototype step (earlier prototypes only, an optimizer of their own): lambda_sp L_sp,
  the distillation of each earlier task's head on its own prototypes passed as images.

Distillation `kd: paper` = mean over earlier tasks of KL(teacher || student) of temperature-T
softmaxes; `kd: code` = the released code's sum over earlier tasks of KL(student || teacher) x T^2.

As the released code (train_hyper2d.py, utils.py): `val_fraction` (its VAL_FRAC 0.1) of each task's
training images is held out, never trained on; their accuracy after the task is `val_acc` in tasks.parquet
(the code logs it and selects nothing with it).

Where this follows the paper rather than the released code:
- the teacher, the prototype pass and evaluation run in eval mode; the code never calls eval(), so
  its batch norm normalises each test batch by its own statistics and updates the running ones
  (`train_mode_eval: true` does as the code; its test batches were BATCH_SIZE, 64: set
  method.eval_batch_size=64 to match them);
- the prototype step uses the gradient of L_sp alone; the code steps on L_sp's gradient plus the
  main loss's gradient, still on the prototypes;
- weight decay is train.weight_decay (0 by default) in every group; the code's AdamW groups spell
  the key "weight_decay " and so get AdamW's default 0.01, prototypes of future tasks included;
- prototypes as images: the grey prototype is repeated to the input's channels (as the code does)
  and zero-padded around the centre to the input's size (zero = the dataset mean after
  normalisation), so every backbone takes it (the code feeds 10x10 images straight into its CNNs);
- semantic init crops the centre of the normalised image, wherever the input size puts it (the code
  hard-codes CIFAR's 32x32 centre crops); the chosen image leaves the task's training set;
- a task's prototypes are made when the task starts, from its own data (the code makes all up front);
- the optimizers start afresh with every task (the code keeps one pair for the whole run).
"""

import copy
from dataclasses import dataclass, field
from enum import Enum
from functools import partial

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, checked
from clrun.data.stream import Split, Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.hypernetwork import HyperNetwork
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import Optimizer, TrainConfig, accuracy, make_optimizer


class KDForm(Enum):
    paper = "paper"  # mean over earlier tasks of KL(teacher || student)
    code = "code"  # pah2025/PAH: sum over earlier tasks of KL(student || teacher) x T^2


@dataclass
class PAHConfig(PerTaskMethodConfig):
    """Prototype-augmented hypernetworks (De La Fuente et al. 2025): heads generated from class prototypes.

    Defaults: pah2025/PAH config/hyper2d.py (its Split-MNIST config)."""

    # AdamW lr 1e-4 for the backbone, batch 64, 15 epochs (pah2025/PAH config/hyper2d.py)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer=Optimizer.adamw, lr=1e-4, epochs=15, batch_size=64)
    )
    # prototypes are prototype_size x prototype_size maps (paper's best: 10)
    prototype_size: int = checked(AT_LEAST_1, 10)
    # 1 (grey, repeated to the input's channels, as the code does) or the input's
    prototype_channels: int = checked(AT_LEAST_1, 1)
    semantic_init: bool = True  # initialise each prototype from a real training image of its class (else N(0.5, 0.1))
    hyper_hidden: int = checked(AT_LEAST_1, 16)  # hypernetwork hidden units (code: 16)
    hyper_layers: int = checked(NON_NEGATIVE, 1)  # hidden-to-hidden layers after the first hidden layer (code: 1)
    # distillation of earlier tasks' generated heads on current images (code's `stability`)
    lambda_sm: float = checked(NON_NEGATIVE, 0.5)
    lambda_sp: float = checked(NON_NEGATIVE, 1.0)  # distillation on earlier tasks' prototypes, the prototype step
    temperature: float = checked(POSITIVE, 2.0)  # KD temperature T (code: 2)
    # the released code's KD, as the published numbers were made (the paper writes the other form: kd=paper)
    kd: KDForm = KDForm.code
    # prototypes, both optimizers (code: 1e-3); the backbone's lr is train.lr (code: 1e-4)
    prototype_lr: float = checked(POSITIVE, 1e-3)
    hyper_lr: float = checked(POSITIVE, 1e-3)  # hypernetwork (code: 1e-3)
    # held out of each task's training images, never trained on (the released code's VAL_FRAC); 0: none
    val_fraction: float = checked(FRACTION, 0.1)
    # batch norm in train mode in test passes, the teacher and the prototype pass, as the released code (it never
    # calls eval()); false: eval mode, as the paper intends
    train_mode_eval: bool = False


RANDOM_INIT = (0.5, 0.1)  # mean and std of prototypes without semantic init (code: mean/std_initialization_prototypes)


def distillation(students: list[torch.Tensor], teachers: list[torch.Tensor], temperature: float, form: str):
    """Distillation of each earlier task's logits (student, teacher pairs), KL of temperature softmaxes
    averaged over the batch: `paper` = mean over tasks of KL(teacher || student); `code` = sum over
    tasks of KL(student || teacher) x T^2 (pah2025/PAH utils.distillation_output_loss, without its clamp)."""
    total = students[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(students, teachers, strict=True):
        log_s = F.log_softmax(student.float() / temperature, dim=1)
        log_t = F.log_softmax(teacher.float() / temperature, dim=1)
        if form == "paper":
            total = total + (log_t.exp() * (log_t - log_s)).sum(1).mean()
        else:
            total = total + (log_s.exp() * (log_s - log_t)).sum(1).mean() * temperature**2
    return total / len(students) if form == "paper" else total


def init_hypernet(hypernet: HyperNetwork) -> None:
    """The code's init (networks/metamodules.py): Kaiming normal (fan in) on every layer, the last one / 10."""
    layers = [m for m in hypernet.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    with torch.no_grad():
        layers[-1].weight /= 10


class PAHModel(nn.Module):
    """Backbone, hypernetwork and one prototype tensor (C, channels, s, s) per task."""

    def __init__(self, backbone: nn.Module, hypernet: HyperNetwork, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.hypernet = hypernet
        self.prototypes = nn.ParameterList()
        self.input_shape = input_shape

    def head(self, task: int) -> torch.Tensor:
        """Task `task`'s generated head weight (C, D)."""
        return self.hypernet.split(self.hypernet(self.prototypes[task].flatten()))["weight"]

    def images(self, task: int) -> torch.Tensor:
        """Task `task`'s prototypes as backbone inputs: channels repeated, zero-padded around the centre."""
        prototypes = self.prototypes[task]
        c, h, w = self.input_shape
        s = prototypes.shape[-1]
        top, left = (h - s) // 2, (w - s) // 2
        images = prototypes.expand(-1, c, -1, -1)
        return F.pad(images, (left, w - s - left, top, h - s - top))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task `task`'s generated head."""
        return F.linear(self.backbone(x), self.head(task))


@dataclass
class Teacher:
    """The model before task k, frozen: its backbone, its heads of tasks < k, its logits on their prototypes."""

    backbone: nn.Module
    heads: list[torch.Tensor]
    prototype_logits: list[torch.Tensor]


class PAH(Method):
    config_class = PAHConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        classes = {task.n_classes for task in stream.tasks}
        channels, height, width = stream.input_shape
        s = cfg.prototype_size
        if len(classes) != 1:
            raise ClrunError(f"pah needs the same number of classes in every task, got {sorted(classes)}")
        if s > min(height, width):
            raise ClrunError(f"method.prototype_size={s} is larger than the {height}x{width} inputs")
        if cfg.prototype_channels not in (1, channels):
            raise ClrunError(f"method.prototype_channels must be 1 or the input's {channels} channels")
        self.n_classes = classes.pop()
        backbone = build_backbone(backbone_cfg, stream.input_shape)
        d = backbone.out_features
        hypernet = HyperNetwork(
            self.n_classes * cfg.prototype_channels * s * s,
            [cfg.hyper_hidden] * (cfg.hyper_layers + 1),  # a first hidden layer, then hyper_layers more
            {"weight": torch.Size([self.n_classes, d])},
            activation=nn.LeakyReLU,
            bias=False,
        )
        init_hypernet(hypernet)
        self.base_params = count_params(backbone) + (d + 1) * self.n_classes
        self.model = hw.prepare_model(PAHModel(backbone, hypernet, tuple(stream.input_shape)))
        self.sources: list[list[int]] = []  # per task: the training images the prototypes started from

    def _lr(self, lr: float):
        """`train` with another learning rate (the hypernetwork's and prototypes' optimizer groups)."""
        return OmegaConf.merge(self.cfg.train, {"lr": lr})

    def _testing(self, module: nn.Module) -> nn.Module:
        """`module` set for a test-like pass: eval mode, or train mode as the released code (`train_mode_eval`)."""
        return module.train(self.cfg.train_mode_eval)

    def _held_out(self, task: Task) -> torch.Tensor:
        """The mask of `val_fraction` of the task's training images, drawn with the run's seeded RNG."""
        n = len(task.train)
        held = torch.zeros(n, dtype=torch.bool, device=task.train.y.device)
        held[torch.randperm(n)[: int(self.cfg.val_fraction * n)].to(held.device)] = True
        return held

    def _add_prototypes(self, task: Task, held: torch.Tensor) -> torch.Tensor:
        """Append task `task`'s prototypes, each from a training image outside `held`; return the mask of training
        images left to train on."""
        keep = ~held
        shape = (self.n_classes, self.cfg.prototype_channels, self.cfg.prototype_size, self.cfg.prototype_size)
        sources = []
        if self.cfg.semantic_init:
            for c in range(self.n_classes):
                candidates = torch.nonzero((task.train.y == c) & keep).flatten()
                if not len(candidates):
                    raise ClrunError(f"pah: task {task.index} has no training image of class {c} to start from")
                sources.append(int(candidates[torch.randint(len(candidates), ())]))
            keep[sources] = False
            images = self.stream.prepare(task.train.x[sources], train=False, task=task.index)
            s, (_, h, w) = self.cfg.prototype_size, self.stream.input_shape
            top, left = (h - s) // 2, (w - s) // 2
            crops = images[:, :, top : top + s, left : left + s]
            values = crops.mean(1, keepdim=True) if shape[1] == 1 else crops
        else:
            values = torch.randn(shape, device=self.hw.device) * RANDOM_INIT[1] + RANDOM_INIT[0]
        self.model.prototypes.append(nn.Parameter(values.to(self.hw.device).contiguous()))
        self.sources.append(sources)
        return keep

    @torch.no_grad()
    def _teacher(self, task: int) -> Teacher | None:
        """The frozen model before task `task` (None for the first task)."""
        if task == 0:
            return None
        self._testing(self.model)
        heads = [self.model.head(j) for j in range(task)]
        logits = [F.linear(self.model.backbone(self.model.images(j)), heads[j]) for j in range(task)]
        backbone = copy.deepcopy(self.model.backbone).requires_grad_(False)
        return Teacher(backbone, heads, logits)

    def _loss(self, task: int, teacher: Teacher | None):
        """L_hm + lambda_sm L_sm as a `fit` loss function."""
        model, cfg = self.model, self.cfg

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            features = model.backbone(x)
            hard = F.cross_entropy(F.linear(features, model.head(task)), y)
            if teacher is None:
                return hard
            with torch.no_grad():
                old_features = teacher.backbone(x)
            students = [F.linear(features, model.head(j)) for j in range(task)]
            teachers = [F.linear(old_features, head) for head in teacher.heads]
            return hard + cfg.lambda_sm * distillation(students, teachers, cfg.temperature, cfg.kd.value)

        return loss

    def _prototype_step(self, task: int, teacher: Teacher, optimizer: torch.optim.Optimizer) -> None:
        """One step of `optimizer` (earlier prototypes only) on lambda_sp L_sp; the backbone in eval mode,
        so prototypes leave its batch-norm statistics alone."""
        model, cfg = self.model, self.cfg
        earlier = list(model.prototypes[:task])
        self._testing(model.backbone)
        with self.hw.autocast():
            students = [model(model.images(j), j) for j in range(task)]
            loss = cfg.lambda_sp * distillation(students, teacher.prototype_logits, cfg.temperature, cfg.kd.value)
        grads = torch.autograd.grad(loss, earlier)
        for prototype, grad in zip(earlier, grads, strict=True):
            prototype.grad = grad
        optimizer.step()
        for prototype in earlier:
            prototype.grad = None
        model.backbone.train()

    def learn(self, task: Task) -> dict:
        index = task.index
        held = self._held_out(task)
        keep = self._add_prototypes(task, held)
        teacher = self._teacher(index)
        model = self.model
        after_step = None
        if teacher is not None and self.cfg.lambda_sp > 0:
            optimizer = make_optimizer(model.prototypes[:index], self._lr(self.cfg.prototype_lr), self.hw)

            def after_step(step) -> None:
                self._prototype_step(index, teacher, optimizer)

        stats = self.fit(
            task,
            model,
            model.backbone.parameters(),
            self._loss(index, teacher),
            data=(task.train.x[keep], task.train.y[keep]),
            groups=[
                (model.hypernet.parameters(), self._lr(self.cfg.hyper_lr)),
                (model.prototypes, self._lr(self.cfg.prototype_lr)),
            ],
            after_step=after_step,
        )
        row = stats.row()
        if held.any():
            val = Split(task.train.x[held], task.train.y[held])
            predict = partial(self.predict, task=index)
            row["val_acc"] = accuracy(predict, val, self.stream, self.hw, self.cfg.eval_batch_size, index)
        return row

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self._testing(self.model)
        return self.model(x, task)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "sources": self.sources}

    def load_state_dict(self, state: dict) -> None:
        shape = (self.n_classes, self.cfg.prototype_channels, self.cfg.prototype_size, self.cfg.prototype_size)
        for _ in state["sources"]:
            self.model.prototypes.append(nn.Parameter(torch.zeros(shape, device=self.hw.device)))
        self.model.load_state_dict(state["model"])
        self.sources = [list(sources) for sources in state["sources"]]

    def footprint(self) -> Footprint:
        """Backbone, hypernetwork and every task's prototypes."""
        return Footprint(count_params(self.model), module_bytes(self.model), self.base_params)
