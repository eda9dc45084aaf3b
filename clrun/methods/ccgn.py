"""CCGN: conditional channel gated networks (Abati, Tomczak, Blankevoort, Calderara, Cucchiara & Bejnordi,
CVPR 2020), with its task classifier for the class and domain scenarios.

Every hidden unit or channel of a chain backbone (`clrun.models.gating.gated_layers`) gets, per task,
a gate computed from the layer's own input: global average pool -> Linear(`gate_hidden`) -> ReLU ->
one logit per output channel. The gate multiplies the activation's output:

- training: a binary Gumbel-sigmoid sample at `temperature`, straight-through (the hard 0/1 value
  forward, the relaxed sample's gradient backward); loss = CE + `sparsity` * mean over layers of the
  mean gate;
- test: 1[logit > 0], times the task's relevant channels (so a task never opens a channel it did
  not use in training, whose weights later tasks may change);
- after the task: a channel is relevant when its test-mode gate fires on more than `relevance` of
  the task's training images. Weights from relevant inputs into relevant outputs (and relevant
  outputs' biases) of every earlier task get zero gradient for all later tasks (HAT's rule,
  `clrun.methods.parts.gate_training.gradient_factors`, with the union of relevant channels as a 0/1 mask).

Batch norm is kept per task (a shared one would let later tasks move earlier tasks' statistics): each task
trains its own copy, starting from the previous task's. Each task starts a fresh optimizer and weight decay is
added to the gradient before masking, so frozen weights stay exactly equal and earlier tasks' logits are bit-identical.

Task classifier (class and domain scenarios, `task_classifier` with `task_id` none; `task_id=confidence|entropy`
uses the base class's rule instead). As the paper describes it, an input goes through every learned task's
gated branch in parallel (its gates, relevant channels and batch norm) and a task classifier reads the candidate
features of all branches and predicts the task; that task's head answers. Here the candidates are the backbone's
(pooled) output features per branch, concatenated, into an MLP Linear(`classifier_hidden`) -> ReLU -> one logit
per task (the ChannelGatedCL port's classifier: pool each branch's last feature map, concatenate, 64 hidden).
It is trained after each task, with the gated network frozen (its features are computed without gradient, in
eval mode), on the current task's training images and an episodic memory of earlier tasks' images
(`clrun.methods.parts.replay.Memory`, `memory.budget`, `memory.policy`): loss (1/t) CE on current + (1 - 1/t) CE on
replayed, t tasks so far, so every task weighs the same; then the task's images are offered to the memory. The
classifier is rebuilt from scratch for each new number of tasks (the port widens the old one instead).

Unverified (the paper's method section was not readable here): the classifier's exact architecture and which
features it reads (the port's choice is used), whether the paper trains it jointly with the task (here: after,
the network frozen, so earlier tasks' logits stay bit-identical), its training recipe and the memory budget
(`classifier_train`, `memory`: the recipe and budget of clrun's `er`). The paper's generative-memory variant is
not implemented; the episodic one is.

Not implemented either: the re-initialisation of unused channels after each task, and the port's sparsity
warm-up (sparsity acts from the first step).
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.methods.parts.gate_training import gradient_factors, restrict_gradients
from clrun.methods.parts.replay import Memory, ReplayConfig
from clrun.models.gating import GatedLayer, batch_norm_state, gated_layers
from clrun.models.layers import Conv2d
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import TrainConfig, embed, eval_batches


@dataclass
class CCGNConfig(PerTaskMethodConfig):
    """CCGN (Abati et al. 2020): per-task input-conditioned channel gates (Gumbel-softmax), used channels frozen."""

    sparsity: float = checked(NON_NEGATIVE, 0.5)  # lambda_s on the mean gate activation (ChannelGatedCL port: 0.5)
    gate_hidden: int = checked(AT_LEAST_1, 16)  # hidden units of each gating MLP (paper: 16 [unverified])
    # Gumbel-sigmoid temperature while training (a common choice; not from the paper)
    temperature: float = checked(POSITIVE, 0.6666666666666666)
    # a channel is relevant (frozen afterwards) when its gate fires on more than this share of the task's training
    # images (0: ever fires, which makes earlier tasks' logits exact; port: 0.8 probability)
    relevance: float = checked(FRACTION, 0.0)
    task_classifier: bool = True  # class/domain scenarios with task_id none: the paper's task classifier picks the task
    classifier_hidden: int = checked(
        AT_LEAST_1, 64
    )  # hidden units of the task classifier's MLP (ChannelGatedCL port: 64)
    # the task classifier's training after each task, the gated network frozen (defaults Adam 1e-3, batch 128,
    # 2 epochs: not from the paper)
    classifier_train: TrainConfig = field(default_factory=TrainConfig)
    # episodic memory of earlier tasks' images for the task classifier (budget: not from the paper)
    memory: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=1000))


def gate_inputs(layer: nn.Module) -> int:
    """Features a layer's gating module reads: input channels (conv) or input features (linear)."""
    return layer.in_channels if isinstance(layer, Conv2d) else layer.in_features


class ChannelGates:
    """Input-conditioned gates on the given layers, applied through hooks while `modules` is set: a pre-hook
    computes each layer's gates from its input, a hook on its activation multiplies them in. Each pass's
    gates are kept in `record` (per layer, batch x units)."""

    def __init__(self, layers: list[GatedLayer], temperature: float) -> None:
        self.temperature = temperature
        self.modules: nn.ModuleList | None = None
        self.masks: list[torch.Tensor] | None = None  # test: the task's relevant channels
        self.record: list[torch.Tensor] = []
        for i, gated in enumerate(layers):
            gated.layer.register_forward_pre_hook(lambda module, inputs, i=i: self._compute(i, inputs[0]))
            gated.activation.register_forward_hook(lambda module, inputs, output, i=i: self._apply(i, output))

    def _compute(self, index: int, x: torch.Tensor) -> None:
        if self.modules is None:
            return
        pooled = x.mean((2, 3)) if x.dim() == 4 else x
        logits = self.modules[index](pooled)
        if self.modules.training:  # binary Gumbel-sigmoid, straight-through
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / self.temperature)
            gate = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
        else:
            gate = (logits > 0).to(logits.dtype)
            if self.masks is not None:
                gate = gate * self.masks[index]
        self.record.append(gate)

    def _apply(self, index: int, output: torch.Tensor) -> torch.Tensor | None:
        if self.modules is None:
            return None
        gate = self.record[-1].to(output.dtype)
        return output * gate.view(*gate.shape, *([1] * (output.dim() - 2)))

    def use(self, modules: nn.ModuleList, masks: list[torch.Tensor] | None = None):
        """Gate with `modules` (and, at test, `masks`) until `off()`; clears `record`."""
        self.modules, self.masks, self.record = modules, masks, []

    def off(self) -> None:
        self.modules, self.masks = None, None


class CCGN(Method):
    config_class = CCGNConfig

    @classmethod
    def budget_key(cls) -> str:
        return "memory.budget"  # the task classifier's memory

    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([], scenario="task")  # a head per task; class/domain infer the task
        self.layers = gated_layers(self.model.backbone, "ccgn")
        self.gates = ChannelGates(self.layers, cfg.temperature)
        self.gaters = nn.ModuleList()  # per task, a gating module per layer
        self.norms: list[dict[str, torch.Tensor]] = []  # per task, its batch-norm tensors
        self.relevant: list[list[torch.Tensor]] = []  # per task, per layer: 0/1 float of the channels it uses
        self.frozen = [torch.zeros(g.units, device=hw.device) for g in self.layers]  # union over learned tasks
        self.classifying = cfg.task_classifier and cfg.task_id.value == "none" and stream.scenario != "task"
        if self.classifying and not cfg.memory.budget:
            raise ClrunError("method ccgn: the task classifier needs method.memory.budget > 0")
        # filled only for the task classifier
        self.memory = Memory(cfg.memory.budget, cfg.memory.policy.value, len(stream.tasks))
        self.classifier: nn.Sequential | None = None  # the task classifier over the tasks learned so far

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        """Every scenario with the task classifier or a `task_id` rule; else the task scenario."""
        return ("task", "class", "domain") if cfg.task_classifier else super().supported_scenarios(cfg)

    def new_gaters(self) -> nn.ModuleList:
        """A gating module per layer: pool -> Linear(gate_hidden) -> ReLU -> Linear(units)."""
        hidden = self.cfg.gate_hidden
        modules = [
            nn.Sequential(nn.Linear(gate_inputs(g.layer), hidden), nn.ReLU(), nn.Linear(hidden, g.units))
            for g in self.layers
        ]
        return nn.ModuleList(modules).to(self.hw.device)

    def learn(self, task: Task) -> dict:
        cfg, model = self.cfg, self.model
        head = model.add_head(task.n_classes)
        gaters = self.new_gaters()
        params = list(model.backbone.parameters()) + list(model.heads.heads[head].parameters())
        factors = gradient_factors(self.layers, self.frozen) if task.index else None

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            self.gates.use(gaters)
            logits = model(x, head)
            self.gates.off()
            opened = torch.stack([g.mean() for g in self.gates.record]).mean()
            return F.cross_entropy(logits, y) + cfg.sparsity * opened

        def after_backward(step, optimizers) -> None:
            restrict_gradients(params, cfg.train.weight_decay, self.layers, factors)

        gaters.train()
        recipe = OmegaConf.merge(cfg.train, {"weight_decay": 0.0})
        stats = self.fit(task, model, params + list(gaters.parameters()), loss, recipe, after_backward=after_backward)
        gaters.eval().requires_grad_(False)
        self.gaters.append(gaters)
        self.norms.append(batch_norm_state(model.backbone))
        relevant = [(f > cfg.relevance).float() for f in self.firing(task, gaters)]
        self.relevant.append(relevant)
        self.frozen = [torch.maximum(f, r) for f, r in zip(self.frozen, relevant, strict=True)]
        row = {**stats.row(), "open": self.open_share(relevant)}
        if self.classifying:
            row["classifier_loss"] = self.train_classifier(task)
            self.memory.add(task, partial(self.branch_features, task=task.index))
        return row

    @torch.no_grad()
    def firing(self, task: Task, gaters: nn.ModuleList) -> list[torch.Tensor]:
        """Per layer, the share of the task's training images on which each test-mode gate fires."""
        self.model.eval()
        counts = [torch.zeros(g.units, device=self.hw.device) for g in self.layers]
        for (x,) in eval_batches((task.train.x,), self.stream, self.hw, self.cfg.eval_batch_size, task.index):
            self.gates.use(gaters)
            self.model.backbone(x)
            self.gates.off()
            counts = [c + g.sum(0) for c, g in zip(counts, self.gates.record, strict=True)]
        return [c / len(task.train) for c in counts]

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The backbone's features of a batch of prepared images through task `task`'s gated branch."""
        self.model.eval()
        self.gates.use(self.gaters[task], self.relevant[task])
        features = functional_call(self.model.backbone, self.norms[task], (x,))
        self.gates.off()
        return features

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.model.heads(self.features(x, task), task)

    def branch_features(self, images: torch.Tensor, task: int) -> torch.Tensor:
        """Task `task`'s branch features of uint8 images (what the `herding` memory policy ranks)."""
        return embed(partial(self.features, task=task), images, self.stream, self.hw, self.cfg.eval_batch_size, task)

    # ---- the task classifier -----------------------------------------------------------
    def new_classifier(self, n_tasks: int) -> nn.Sequential:
        """The task classifier over `n_tasks` branches: Linear(`classifier_hidden`) -> ReLU -> a logit per task."""
        n_inputs = n_tasks * self.model.backbone.out_features
        hidden = self.cfg.classifier_hidden
        return nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks)).to(self.hw.device)

    @torch.no_grad()
    def candidates(self, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
        """The task classifier's input: the features of tasks 0..n_tasks-1's branches, concatenated."""
        return torch.cat([self.features(x, task) for task in range(n_tasks)], dim=1)

    def train_classifier(self, task: Task) -> float:
        """A new task classifier over tasks 0..task, trained on the task's images and the memory's earlier ones
        with the gated network frozen; returns its last epoch's loss (NaN for the first task: nothing to train)."""
        n_tasks = task.index + 1
        self.classifier = self.new_classifier(n_tasks)
        if not len(self.memory):
            self.classifier.eval().requires_grad_(False)
            return float("nan")
        cfg, stream = self.cfg, self.stream
        batch_size = cfg.memory.batch_size or cfg.classifier_train.batch_size
        current_weight = 1 / n_tasks

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            replayed, _, tasks = self.memory.sample(batch_size, stream, self.hw)
            logits = self.classifier(self.candidates(torch.cat([x, replayed]), n_tasks))
            targets = torch.cat([torch.full_like(y, task.index), tasks])
            per_sample = F.cross_entropy(logits, targets, reduction="none")
            return current_weight * per_sample[: len(x)].mean() + (1 - current_weight) * per_sample[len(x) :].mean()

        classifier = self.classifier
        stats = self.fit(task, classifier, classifier.parameters(), loss, cfg.classifier_train, "task classifier")
        self.classifier.eval().requires_grad_(False)
        return stats.loss

    def infer_task(self, x: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """The task classifier's pick (with `task_id` set: the base class's rule)."""
        if not self.classifying:
            return super().infer_task(x, logits)
        return self.classifier(self.candidates(x, len(logits))).argmax(1)

    # ---- accounting and persistence ----------------------------------------------------
    def open_share(self, masks: list[torch.Tensor]) -> float:
        """Share of gated units the 0/1 `masks` open."""
        return sum(float(m.sum()) for m in masks) / sum(g.units for g in self.layers)

    def summary(self) -> dict:
        return {"capacity": self.open_share(self.frozen)}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "gaters": self.gaters.state_dict(),
            "norms": self.norms,
            "relevant": self.relevant,
            "frozen": self.frozen,
            "classifier": None if self.classifier is None else self.classifier.state_dict(),
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        n = len(state["relevant"])
        for task in self.stream.tasks[len(self.model.heads.heads) : n]:
            self.model.add_head(task.n_classes)
        self.model.load_state_dict(state["model"])
        self.gaters = nn.ModuleList([self.new_gaters().eval().requires_grad_(False) for _ in range(n)])
        self.gaters.load_state_dict(state["gaters"])
        device = self.hw.device
        self.norms = [{k: v.to(device) for k, v in norm.items()} for norm in state["norms"]]
        self.relevant = [[m.to(device) for m in task] for task in state["relevant"]]
        self.frozen = [f.to(device) for f in state["frozen"]]
        if state["classifier"] is not None:
            self.classifier = self.new_classifier(n).eval().requires_grad_(False)
            self.classifier.load_state_dict(state["classifier"])
        self.memory.load_state_dict(state["memory"], device)

    def footprint(self) -> Footprint:
        """Shared weights once, every head; per task its gating modules, batch norm (statistics as bytes) and
        relevant-channel masks (a byte per channel); the task classifier and the memory's images (bytes)."""
        backbone = self.model.backbone
        norm_names = set(batch_norm_state(backbone))
        shared = [p for name, p in backbone.named_parameters() if name not in norm_names]
        params = sum(p.numel() for p in shared) + count_params(self.model.heads) + count_params(self.gaters)
        size = tensor_bytes(shared) + module_bytes(self.model.heads)
        size += module_bytes(self.gaters)
        for norm, relevant in zip(self.norms, self.relevant, strict=True):
            params += sum(v.numel() for k, v in norm.items() if k.endswith(("weight", "bias")))
            size += tensor_bytes(norm.values())
            size += sum(m.numel() for m in relevant)
        if self.classifier is not None:
            params += count_params(self.classifier)
            size += module_bytes(self.classifier)
        base = count_params(backbone) + count_params(self.model.heads.heads[0])
        return self.memory.add_to(Footprint(params=params, bytes=size, base_params=base))
