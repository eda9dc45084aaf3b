"""HAT: hard attention to the task (Serra, Suris, Miron & Karatzoglou, ICML 2018; joansj/hat).

Every hidden unit or channel l,i has a learned embedding per task t; its gate
a = sigmoid(s e) multiplies the unit's activation (`clrun.models.gating`). While
task t trains (in the order of joansj/hat's training loop, src/approaches/hat.py):

- s is annealed within each epoch, s = 1/s_max + (s_max - 1/s_max) i/N at the batch's
  sample offset i (code; `paper_anneal`: (b-1)/(B-1) by batch number, reaching s_max);
- loss = CE + c R, R = sum a^t (1 - a^{<t}) / sum (1 - a^{<t}) over all gated units
  (for t = 1 the mean gate), a^{<t} the cumulative mask;
- weight gradients are multiplied by 1 - min(a^{<t} of the output unit, of the input unit)
  (the first layer: output unit only; a Linear after a conv's flatten repeats the
  channel's gate over its positions), bias gradients by 1 - a^{<t} of the output unit;
- the embeddings' gradients are compensated, times s_max (cosh(clamp(s e, ±50)) + 1) /
  (s (cosh(e) + 1)); then the gradient norm is clipped (10000) and plain SGD steps;
- the embeddings are clamped to [-6, 6].
After the task, its gates at s = s_max join the cumulative mask: a^{<=t} = max(a^{<t}, a^t).
Task t predicts with its gates at s_max (the code's test; `binarize`: 1[e > 0]), its head.

Departures from joansj/hat: no validation split, so no lr decay on plateaus, early
stopping or best-model restore (train.epochs / train.iterations decide); only the current
task's embedding and head are trained (the code steps every parameter with zero gradient).

Batch norm (convnet, vgg16_bn) is kept per task (a shared one would let later tasks move earlier
tasks' statistics and affine parameters): a task trains its own copy of every batch-norm tensor,
starting from the previous task's, and predicts with it.

Zero forgetting. Earlier tasks' embeddings, heads and batch norms are not trained. A shared
weight keeps its value exactly when its gradient factor is exactly 0, i.e. when an earlier
task's gate on its output (and input) unit is exactly 1.0, and a unit an earlier task gates
exactly 0.0 never reaches that task's output. Within a task the factors are constant and
each task starts a fresh optimizer, so momentum and Adam moments of such weights stay 0;
weight decay is added to the gradient before the factors (never to frozen weights). So
earlier tasks' logits stay bit-identical whenever their gates are exactly 0 or 1: always
with `binarize`; with sigmoid(s_max e) (float32) when every |e| is outside about
(-0.22, 0.043). `summary()` counts the gates that are not (`fractional_gates`) and reports
capacity use (share of units with cumulative gate > 0.5).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from clrun.config import NON_NEGATIVE, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.methods.parts.gate_training import compensate, gradient_factors, restrict_gradients, steepness
from clrun.models.gating import Gates, batch_norm_state, gated_layers
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import Optimizer, Step, TrainConfig


@dataclass
class HATConfig(PerTaskMethodConfig):
    """HAT (Serra et al. 2018): learned per-task sigmoid gates on hidden units; defaults: joansj/hat."""

    # plain SGD lr 0.05, batch 64, no momentum, no weight decay (joansj/hat); its validation-driven lr decay and
    # early stopping are not used here: train.epochs / train.iterations decide
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, batch_size=64, optimizer=Optimizer.sgd, lr=0.05, momentum=0.0)
    )
    s_max: float = checked(POSITIVE, 400.0)  # gate steepness at the end of each epoch and at test (code's grid 25-800)
    c: float = checked(NON_NEGATIVE, 0.75)  # attention regulariser weight (code's `lamb`, grid 0.1-4)
    # embeddings clamped to [-clamp, clamp] after each step (code's thres_emb)
    embedding_clamp: float = checked(POSITIVE, 6.0)
    # gradient-norm clip (code: 10000; null: none)
    clip_grad_norm: Optional[float] = checked(Rule(POSITIVE.test, "null (no clipping) or positive"), 10000.0)
    paper_anneal: bool = False  # s reaches s_max at each epoch's last batch (paper) instead of at offset i/N (code)
    binarize: bool = False  # test and cumulative masks 1[e > 0] instead of the code's sigmoid(s_max e)


class HAT(Method):
    config_class = HATConfig
    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([], scenario="task")  # a head per task; class/domain go through `task_id`
        self.layers = gated_layers(self.model.backbone, "hat")
        self.gates = Gates(self.layers)
        self.embeddings: list[list[torch.Tensor]] = []  # per learned task, per gated layer
        self.norms: list[dict[str, torch.Tensor]] = []  # per learned task, its batch-norm tensors
        self.cumulative = [torch.zeros(g.units, device=hw.device) for g in self.layers]  # a^{<t}

    # ---- gates -----------------------------------------------------------------------
    def task_gates(self, task: int) -> list[torch.Tensor]:
        """Task `task`'s gates at s = s_max (`binarize`: 1[e > 0])."""
        if self.cfg.binarize:
            return [(e > 0).float() for e in self.embeddings[task]]
        return [torch.sigmoid(self.cfg.s_max * e) for e in self.embeddings[task]]

    def anneal(self, step: Step) -> float:
        """s for a training step: by batch number (`paper_anneal`) or by the batch's image offset (the code)."""
        progress = step.epoch_progress if self.cfg.paper_anneal else step.offset / step.images
        return steepness(self.cfg.s_max, progress)

    def attention_penalty(self, gates: list[torch.Tensor]) -> torch.Tensor:
        """R = sum a^t (1 - a^{<t}) / sum (1 - a^{<t}) over every gated unit (the mean gate for the first task)."""
        free = [1 - c for c in self.cumulative]
        used = sum((g * f).sum() for g, f in zip(gates, free, strict=True))
        return used / sum(f.sum() for f in free)

    # ---- learning --------------------------------------------------------------------
    def learn(self, task: Task) -> dict:
        cfg, model = self.cfg, self.model
        head = model.add_head(task.n_classes)
        device = self.hw.device
        embeddings = [nn.Parameter(torch.randn(g.units, device=device)) for g in self.layers]  # nn.Embedding: N(0, 1)
        params = list(model.backbone.parameters()) + list(model.heads.heads[head].parameters())
        factors = gradient_factors(self.layers, self.cumulative) if task.index else None

        def loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            gates = [torch.sigmoid(self.anneal(step) * e) for e in embeddings]
            with self.gates.use(gates):
                logits = model(x, head)
            return F.cross_entropy(logits, y) + cfg.c * self.attention_penalty(gates)

        def after_backward(step: Step, optimizers) -> None:
            restrict_gradients(params, cfg.train.weight_decay, self.layers, factors)
            compensate(embeddings, self.anneal(step), cfg.s_max)
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params + embeddings, cfg.clip_grad_norm)

        def after_step(step: Step) -> None:
            with torch.no_grad():
                for e in embeddings:
                    e.clamp_(-cfg.embedding_clamp, cfg.embedding_clamp)

        stats = self.fit(
            task,
            model,
            params + embeddings,
            loss,
            OmegaConf.merge(cfg.train, {"weight_decay": 0.0}),
            after_backward=after_backward,
            after_step=after_step,
        )
        self.embeddings.append([e.detach().clone() for e in embeddings])
        self.norms.append(batch_norm_state(model.backbone))
        self.cumulative = [
            torch.maximum(c, a) for c, a in zip(self.cumulative, self.task_gates(task.index), strict=True)
        ]
        return {**stats.row(), "capacity": self.capacity()}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        with self.gates.use(self.task_gates(task)):
            features = functional_call(self.model.backbone, self.norms[task], (x,))
        return self.model.heads(features, task)

    # ---- accounting and persistence --------------------------------------------------
    def capacity(self) -> float:
        """Share of gated units whose cumulative gate exceeds 0.5 (HAT's capacity use)."""
        used = sum(int((c > 0.5).sum()) for c in self.cumulative)
        return used / sum(g.units for g in self.layers)

    def fractional_gates(self) -> int:
        """Gates at s_max of learned tasks that are neither exactly 0 nor exactly 1."""
        return sum(int(((a > 0) & (a < 1)).sum()) for t in range(len(self.embeddings)) for a in self.task_gates(t))

    def summary(self) -> dict:
        return {"capacity": self.capacity(), "fractional_gates": self.fractional_gates()}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "embeddings": self.embeddings,
            "norms": self.norms,
            "cumulative": self.cumulative,
        }

    def load_state_dict(self, state: dict) -> None:
        for task in self.stream.tasks[len(self.model.heads.heads) : len(state["embeddings"])]:
            self.model.add_head(task.n_classes)
        self.model.load_state_dict(state["model"])
        device = self.hw.device
        self.embeddings = [[e.to(device) for e in task] for task in state["embeddings"]]
        self.norms = [{k: v.to(device) for k, v in norm.items()} for norm in state["norms"]]
        self.cumulative = [c.to(device) for c in state["cumulative"]]

    def footprint(self) -> Footprint:
        """Shared weights and biases once; per task its embeddings, batch norm (statistics as bytes) and head;
        the cumulative mask (bytes)."""
        backbone = self.model.backbone
        norm_names = set(batch_norm_state(backbone))
        shared = [p for name, p in backbone.named_parameters() if name not in norm_names]
        params = sum(p.numel() for p in shared) + count_params(self.model.heads)
        size = tensor_bytes(shared) + module_bytes(self.model.heads)
        for embeddings, norm in zip(self.embeddings, self.norms, strict=True):
            params += sum(e.numel() for e in embeddings)
            params += sum(v.numel() for k, v in norm.items() if k.endswith(("weight", "bias")))
            size += tensor_bytes([*embeddings, *norm.values()])
        size += tensor_bytes(self.cumulative)
        base = count_params(backbone) + count_params(self.model.heads.heads[0])
        return Footprint(params=params, bytes=size, base_params=base)
