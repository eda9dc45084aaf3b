"""DEN: dynamically expandable networks (Yoon, Yang, Lee & Hwang, ICLR 2018; jaehong31/DEN) on chain backbones.

The network is the backbone's weight layers in forward order (`mlp`, `convnet`, `vgg16_bn`); their units only ever
grow by appending. A unit is an output feature of a linear layer or an output channel of a convolution; its
incoming weights are its row or its filter (the out-channel slice). Task 0 trains everything with L1. Each later
task t:

1. selective retraining: the new head trains alone with L1; a breadth-first search down from the head over non-zero
   weights picks the subnetwork S; S and the head retrain with L1 and the drift term `drift` * ||W_S - W_S^{t-1}||^2;
2. dynamic expansion: if that phase's loss (mean of its last epoch) is above `tau`, each layer gets `k` new units
   (their incoming weights from every unit below, old units read nothing from them); only the new units and the
   head train, with L1 and a group lasso `group_lasso` on each new unit's incoming weights; new units whose weights
   reach zero are deleted;
3. split/duplication: a unit that existed before task t and whose incoming weights drifted more than `sigma` (L2
   norm) gets a copy appended carrying its new weights, while the unit gets its old weights back for the old tasks;
   at most `k` units per layer, the largest drifts (the code takes the smallest drifts above sigma, an argsort
   quirk); the head's weight on a split top unit moves to its copy, and the units created in task t plus the head
   retrain with L1;
4. timestamps: task t records each layer's width and predicts with the first units only (slicing), so units added
   later never reach it.

L1 and the group lasso are proximal soft-threshold steps (lr * weight) after each optimizer step, as in the code.
Each phase starts a fresh optimizer; entries a phase does not train get no gradient and are restored after each
step. Departures from the code: softmax cross-entropy (the code: sigmoid BCE on one-vs-rest tasks), selection reads
every head column (the code reads the first only), no l2 weight decay and no lr decay. Old units are only
L2-regularised, so DEN forgets except for split units and timestamps.

Convolutions are a re-implementation choice (the official code is MLP-only). Expansion appends `k` channels per
convolution as it appends `k` units per linear layer. The search goes down through a convolution from a selected
channel to every input channel with a non-zero kernel entry between them. The flatten between the last convolution
and the first linear layer gives each channel its H*W consecutive input features, which are added, removed, sliced
and searched together. Batch norm (`convnet`, `vgg16_bn`) is kept per task (a shared one would move with every
task): task t starts from a
copy of task t-1's, trains it in every phase (weight and bias by the optimizer, running statistics by the batches)
and predicts with it; new channels get fresh entries (weight 1, bias 0, statistics 0 and 1), a split copy those of
its channel. Pooling, ReLU and flatten stay as they are.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import NON_NEGATIVE, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.columns import cut_stages, layer_sequence
from clrun.models.gating import CHAIN_BACKBONES
from clrun.results import Footprint, count_params, tensor_bytes
from clrun.train import FitStats, TrainConfig


@dataclass
class DENConfig(PerTaskMethodConfig):
    """DEN (Yoon et al. 2018): selective retraining, expansion with group-sparse pruning, split/duplication, timestamps;
    defaults: the official DEN_run.py (MLP 784-312-128, Permuted MNIST)."""

    # Adam lr 1e-3, batch 256 (code); every phase (head, selective retraining, expansion, split retraining) trains
    # train.epochs / train.iterations; the code's 0.95 lr decay per epoch and its l2 weight decay 1e-4 are not used
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, batch_size=256, lr=0.001))
    # L1 weight, applied as a proximal soft-threshold lr*mu after each step (code's l1_lambda)
    mu: float = checked(NON_NEGATIVE, 1e-5)
    # lambda in lambda ||W_S - W_S^{t-1}||^2 of selective retraining and splitting (code's l2_lambda)
    drift: float = checked(NON_NEGATIVE, 0.5)
    # group lasso weight on the new units' incoming weights, proximal (code's gl_lambda)
    group_lasso: float = checked(NON_NEGATIVE, 1e-3)
    k: int = checked(NON_NEGATIVE, 10)  # units added per layer by expansion; most units split per layer (code's ex_k)
    tau: float = checked(NON_NEGATIVE, 0.01)  # expand when the selective-retraining loss stays above tau (loss_thr)
    # split a unit whose incoming weights drifted more than sigma in L2 norm (code's spl_thr)
    sigma: float = checked(NON_NEGATIVE, 0.05)


Norm = list[torch.Tensor] | None  # one layer's batch norm for one task: weight, bias, running mean, running var


def uniform(shape: tuple[int, ...], device) -> torch.Tensor:
    """nn.Linear's and nn.Conv2d's default initialisation of a weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(shape, device=device).uniform_(-bound, bound)


def fresh_norm(units: int, device) -> list[torch.Tensor]:
    """Batch-norm tensors for `units` new channels: weight 1, bias 0, running mean 0, running var 1."""
    ones, zeros = torch.ones(units, device=device), torch.zeros(units, device=device)
    return [ones, zeros, zeros.clone(), ones.clone()]


@dataclass
class Layer:
    """One weight layer of the chain and what follows it up to the next one; its tensors live in `DEN`."""

    kind: str  # "conv" (a unit: an output channel) or "linear" (a unit: an output feature)
    conv: dict  # F.conv2d's stride, padding and dilation (conv only)
    norm: tuple[float, float] | None  # the batch norm right after it: momentum and eps (None: none)
    after: nn.Sequential  # the parameter-free modules after that: ReLU, pooling, flatten
    repeat: int  # input features per unit below: H*W for a linear layer after a convolution's flatten, else 1

    def apply(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for input `h` with these weights."""
        if self.kind == "conv":
            return F.conv2d(h, weight, bias, **self.conv)
        return F.linear(h, weight, bias)


def chain(backbone: nn.Module) -> tuple[nn.Sequential, list[Layer], list[tuple[nn.Module, nn.Module | None]]]:
    """The modules before the first weight layer, the weight layers, and each one's module and batch norm."""
    if type(backbone) not in CHAIN_BACKBONES:
        raise ClrunError(
            f"method den grows the units of chain backbones only ({', '.join(CHAIN_BACKBONES.values())}); "
            f"{type(backbone).__name__} has skip connections"
        )
    prefix, stages = cut_stages(layer_sequence(backbone, CHAIN_BACKBONES[type(backbone)]))
    if not stages:
        raise ClrunError("method den needs hidden layers to grow (mlp with hidden=[] has none)")
    layers, modules, below = [], [], None
    for module, rest in stages:
        rest = list(rest)
        norm = rest.pop(0) if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm) else None
        conv = isinstance(module, nn.Conv2d)
        inputs, units = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
        layers.append(
            Layer(
                kind="conv" if conv else "linear",
                conv={"stride": module.stride, "padding": module.padding, "dilation": module.dilation} if conv else {},
                norm=None if norm is None else (norm.momentum, norm.eps),
                after=nn.Sequential(*rest),
                repeat=1 if below is None else inputs // below,
            )
        )
        modules.append((module, norm))
        below = units
    return prefix, layers, modules


class DEN(Method):
    config_class = DENConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        backbone = build_backbone(backbone_cfg, stream.input_shape)
        self.prefix, self.layers, modules = chain(backbone)
        self.weights = [m.weight.detach().clone().to(hw.device) for m, _ in modules]
        self.biases = [None if m.bias is None else m.bias.detach().clone().to(hw.device) for m, _ in modules]
        self.initial_norms: list[Norm] = []  # task 0's batch norm starts from the backbone's
        for _, n in modules:
            tensors = [] if n is None else [n.weight, n.bias, n.running_mean, n.running_var]
            self.initial_norms.append([t.detach().clone().to(hw.device) for t in tensors] or None)
        self.base_params = count_params(backbone)
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # per task: weight, bias
        self.norms: list[list[Norm]] = []  # per task: each layer's batch norm (None: the layer has none)
        self.widths: list[list[int]] = []  # per task: each layer's width at its timestamp
        self.events: list[dict] = []  # per task: units added, pruned, split

    def forward(self, x, weights, biases, norms, head, widths=None, training=False) -> torch.Tensor:
        """Logits through each layer's first `widths` units (None: all) with these tensors and `head` (weight, bias);
        batch norm on batch statistics (updating the running ones) when `training`."""
        h = self.prefix(x)
        for index, (layer, w, b, norm) in enumerate(zip(self.layers, weights, biases, norms, strict=True)):
            n = len(w) if widths is None else widths[index]
            h = layer.apply(h, w[:n, : h.shape[1]], None if b is None else b[:n])
            if norm is not None:
                h = F.batch_norm(h, norm[2], norm[3], norm[0], norm[1], training, *layer.norm)
            h = layer.after(h)
        return F.linear(h, head[0][:, : h.shape[1]], head[1])

    # ---- one training phase ------------------------------------------------------------
    def phase(self, task: Task, rows: list | None = None, cols: list | None = None, drift=False, group=False) -> float:
        """Train the head, the task's batch norm and the incoming weights and biases of the units `rows` marks per
        layer (None: none), from the units below `cols` marks (None: all); with L1 (and the drift term, and the
        group lasso on the `rows` units when `group`); return the loss."""
        cfg = self.cfg
        n = len(self.layers)
        current = self.norms[-1]
        affine = [t for norm in current if norm is not None for t in norm[:2]]
        tensors = [*self.weights, *self.biases, *self.heads[-1], *affine]
        trainable = [None] * (2 * n) if rows is None else [*self.weight_masks(rows, cols), *rows]
        trainable += [torch.ones_like(t, dtype=torch.bool) for t in tensors[2 * n :]]
        start = [None if t is None else t.clone() for t in tensors]
        params = [None if t is None else nn.Parameter(t.clone()) for t in tensors]
        chosen = [
            (p, m, s, i)
            for i, (p, m, s) in enumerate(zip(params, trainable, start, strict=True))
            if m is not None and p is not None
        ]
        affine_params = iter(params[2 * n + 2 :])
        norms = [None if norm is None else [next(affine_params), next(affine_params), *norm[2:]] for norm in current]
        shrink_l1 = cfg.train.lr * cfg.mu

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            logits = self.forward(x, params[:n], params[n : 2 * n], norms, params[2 * n : 2 * n + 2], training=True)
            value = F.cross_entropy(logits, y)
            if drift:
                value = value + cfg.drift * sum(((p - s)[m] ** 2).sum() for p, m, s, i in chosen if i < 2 * n)
            return value

        def after_backward(step, optimizers) -> None:
            for p, m, _, _ in chosen:
                p.grad.mul_(m)

        def after_step(step) -> None:
            with torch.no_grad():
                for p, m, s, i in chosen:
                    value = p
                    if i < n or i == 2 * n:  # weights (not biases, not batch norm): L1
                        value = value.sign() * (value.abs() - shrink_l1).clamp(min=0)
                    if group and i < n:  # new units' incoming weights: group lasso
                        unit = (-1, *[1] * (value.dim() - 1))
                        norm = value.flatten(1).norm(dim=1).view(unit).clamp(min=1e-12)
                        scaled = value * (1 - cfg.train.lr * cfg.group_lasso / norm).clamp(min=0)
                        value = torch.where(rows[i].view(unit), scaled, value)
                    p.copy_(torch.where(m, value, s))

        stats = self.fit(
            task,
            nn.ParameterList([p for p in params if p is not None]),
            [p for p, *_ in chosen],
            loss,
            after_backward=after_backward,
            after_step=after_step,
        )
        self.weights = [p.detach() for p in params[:n]]
        self.biases = [None if p is None else p.detach() for p in params[n : 2 * n]]
        self.heads[-1] = (params[2 * n].detach(), params[2 * n + 1].detach())
        self.norms[-1] = [None if norm is None else [t.detach() for t in norm] for norm in norms]
        self.stats.append(stats)
        return stats.loss

    def weight_masks(self, rows: list[torch.Tensor], cols: list | None) -> list[torch.Tensor]:
        """Per layer, the weight entries from the units below `cols` marks (None, and the first layer: every input)
        to the units `rows` marks; a flatten's H*W features of a channel go with the channel."""
        masks = []
        for index, (layer, w, r) in enumerate(zip(self.layers, self.weights, rows, strict=True)):
            c = torch.ones(w.shape[1], dtype=torch.bool, device=r.device)
            if index and cols is not None:
                c = cols[index - 1].repeat_interleave(layer.repeat)
            mask = r[:, None] & c[None, :]
            masks.append(mask.view(*mask.shape, *[1] * (w.dim() - 2)).expand_as(w))
        return masks

    # ---- structural edits ----------------------------------------------------------------
    def add_units(self, index: int, rows, bias, head_cols, norm: Norm = None) -> None:
        """Append units to layer `index` with incoming weights `rows`, `bias` (None: the layer has none) and, in the
        task's batch norm, entries `norm` (None: fresh); the next layer's new columns are 0, the head's (top layer)
        `head_cols` (None: U init)."""
        self.weights[index] = torch.cat([self.weights[index], rows])
        if self.biases[index] is not None:
            self.biases[index] = torch.cat([self.biases[index], bias])
        added = len(rows)
        current = self.norms[-1]
        if current[index] is not None:
            norm = norm or fresh_norm(added, rows.device)
            current[index] = [torch.cat([t, new]) for t, new in zip(current[index], norm, strict=True)]
        if index + 1 < len(self.layers):
            w = self.weights[index + 1]
            zeros = w.new_zeros(len(w), added * self.layers[index + 1].repeat, *w.shape[2:])
            self.weights[index + 1] = torch.cat([w, zeros], dim=1)
        else:
            w, b = self.heads[-1]
            if head_cols is None:
                head_cols = uniform((len(w), w.shape[1] + added), w.device)[:, -added:]
            self.heads[-1] = (torch.cat([w, head_cols], dim=1), b)

    def remove_units(self, index: int, keep: torch.Tensor) -> None:
        """Keep only the units of layer `index` that `keep` marks (and their columns above)."""
        self.weights[index] = self.weights[index][keep]
        if self.biases[index] is not None:
            self.biases[index] = self.biases[index][keep]
        current = self.norms[-1]
        if current[index] is not None:
            current[index] = [t[keep] for t in current[index]]
        if index + 1 < len(self.layers):
            self.weights[index + 1] = self.weights[index + 1][:, keep.repeat_interleave(self.layers[index + 1].repeat)]
        else:
            self.heads[-1] = (self.heads[-1][0][:, keep], self.heads[-1][1])

    def expand(self, task: Task) -> tuple[int, int]:
        """Add k units per layer, train them with L1 + group lasso, delete those whose weights went to zero;
        return the units added and deleted."""
        device, k = self.hw.device, self.cfg.k
        for index in range(len(self.layers)):  # in order: new units read from every unit below, new ones too
            w = self.weights[index]
            bias = None if self.biases[index] is None else torch.zeros(k, device=device)
            self.add_units(index, uniform((k, *w.shape[1:]), device), bias, None)
        rows = [torch.arange(len(w), device=device) >= len(w) - k for w in self.weights]
        self.phase(task, rows, group=True)
        deleted = 0
        for index in range(len(self.layers)):
            keep = ~(rows[index] & (self.weights[index] == 0).flatten(1).all(1))
            deleted += int((~keep).sum())
            self.remove_units(index, keep)
        return k * len(self.layers), deleted

    def split(self, task: Task, old_weights: list, old_biases: list, old: list[int]) -> int:
        """Duplicate up to k drifted old units per layer (the copy keeps the new weights and batch norm, the unit gets
        its old weights); retrain the task's units and the head; return the units split."""
        split = 0
        for index in range(len(self.layers)):
            w, b, before = self.weights[index], self.biases[index], old_weights[index]
            drifts = (w[: old[index], : before.shape[1]] - before).flatten(1).norm(dim=1)
            order = drifts.argsort(descending=True)[: self.cfg.k]
            units = order[drifts[order] > self.cfg.sigma]
            if not len(units):
                continue
            split += len(units)
            head_cols = None
            if index + 1 == len(self.layers):
                head_cols = self.heads[-1][0][:, units].clone()
                self.heads[-1][0][:, units] = 0
            rows, bias = w[units].clone(), None if b is None else b[units].clone()
            norm = self.norms[-1][index]
            norm = None if norm is None else [t[units].clone() for t in norm]
            w[units] = 0
            w[units, : before.shape[1]] = before[units]
            if b is not None:
                b[units] = old_biases[index][units]
            self.add_units(index, rows, bias, head_cols, norm)
            if index + 1 < len(self.layers):  # units created in this task above read the copy as they read the unit
                above, repeat = self.weights[index + 1], self.layers[index + 1].repeat
                columns = (units[:, None] * repeat + torch.arange(repeat, device=units.device)).flatten()
                above[old[index + 1] :, -len(columns) :] = above[old[index + 1] :, columns]
        if split:
            rows = [torch.arange(len(w), device=w.device) >= n for w, n in zip(self.weights, old, strict=True)]
            self.phase(task, rows)
        return split

    # ---- learning ------------------------------------------------------------------------
    def learn(self, task: Task) -> dict:
        device = self.hw.device
        top = len(self.weights[-1])
        self.heads.append((uniform((task.n_classes, top), device), torch.zeros(task.n_classes, device=device)))
        previous = self.norms[-1] if self.norms else self.initial_norms
        self.norms.append([None if norm is None else [t.clone() for t in norm] for norm in previous])
        everything = [torch.ones(len(w), dtype=torch.bool, device=device) for w in self.weights]
        event = {"added": 0, "pruned": 0, "split": 0}
        self.stats = []  # this task's phases
        if task.index == 0:
            self.phase(task, everything)
        else:
            old = [len(w) for w in self.weights]
            old_weights = [w.clone() for w in self.weights]
            old_biases = [None if b is None else b.clone() for b in self.biases]
            self.phase(task)  # the head (and the task's batch norm) alone
            selected = [None] * len(self.layers)  # breadth-first from the head over non-zero weights
            selected[-1] = (self.heads[-1][0] != 0).any(0)
            for index in range(len(self.layers) - 1, 0, -1):
                reads = (self.weights[index][selected[index]] != 0).any(0)  # per input feature (x kernel entry)
                selected[index - 1] = reads.reshape(len(self.weights[index - 1]), -1).any(1)
            loss = self.phase(task, selected, cols=selected, drift=True)
            if loss > self.cfg.tau and self.cfg.k > 0:
                event["added"], event["pruned"] = self.expand(task)
            event["split"] = self.split(task, old_weights, old_biases, old)
        self.widths.append([len(w) for w in self.weights])
        self.events.append(event)
        return {**FitStats.total(self.stats).row(), **event}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.forward(x, self.weights, self.biases, self.norms[task], self.heads[task], self.widths[task])

    # ---- accounting and persistence --------------------------------------------------------
    def summary(self) -> dict:
        return {
            "units": sum(len(w) for w in self.weights),
            "split": sum(e["split"] for e in self.events),
            "pruned": sum(e["pruned"] for e in self.events),
        }

    def state_dict(self) -> dict:
        return {
            "weights": self.weights,
            "biases": self.biases,
            "heads": [list(h) for h in self.heads],
            "norms": self.norms,
            "widths": self.widths,
            "events": self.events,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.hw.device
        self.weights = [w.to(device) for w in state["weights"]]
        self.biases = [None if b is None else b.to(device) for b in state["biases"]]
        self.heads = [(w.to(device), b.to(device)) for w, b in state["heads"]]
        self.norms = [[None if n is None else [t.to(device) for t in n] for n in task] for task in state["norms"]]
        self.widths = [list(w) for w in state["widths"]]
        self.events = [dict(e) for e in state["events"]]

    def footprint(self) -> Footprint:
        """The final network (split copies included), every head, each task's batch norm (its running statistics
        as bytes only), and the widths (timestamps) as bytes."""
        norms = [norm for task in self.norms for norm in task if norm is not None]
        params = [*self.weights, *(b for b in self.biases if b is not None), *(t for h in self.heads for t in h)]
        params += [t for norm in norms for t in norm[:2]]
        buffers = [t for norm in norms for t in norm[2:]]
        size = tensor_bytes(params + buffers) + 8 * sum(len(w) for w in self.widths)
        head0 = self.heads[0][0].shape[0] * (self.heads[0][0].shape[1] + 1) if self.heads else 0
        return Footprint(params=sum(t.numel() for t in params), bytes=size, base_params=self.base_params + head0)
