"""DEN: dynamically expandable networks (Yoon, Yang, Lee & Hwang, ICLR 2018; jaehong31/DEN), MLP only.

The network is a list of hidden weight matrices that only ever grow by appending units. Task 0
trains everything with L1. Each later task t (methods.md §5):

1. selective retraining: the new head trains alone with L1; a breadth-first search down from the
   head over non-zero weights picks the subnetwork S; S and the head retrain with L1 and the drift
   term `drift` * ||W_S - W_S^{t-1}||^2;
2. dynamic expansion: if that phase's loss (mean of its last epoch) is above `tau`, each layer gets
   `k` new units (their incoming weights from every unit below, old units read nothing from them);
   only the new units and the head train, with L1 and a group lasso `group_lasso` on each new unit's
   incoming weights; new units whose weights reach zero are deleted;
3. split/duplication: a unit that existed before task t and whose incoming weights drifted more than
   `sigma` (L2 norm) gets a copy appended carrying its new weights, while the unit gets its old
   weights back for the old tasks; at most `k` units per layer, the largest drifts (the code takes
   the smallest drifts above sigma, an argsort quirk); the head's weight on a split top unit moves
   to its copy, and the units created in task t plus the head retrain with L1;
4. timestamps: task t records each layer's width and predicts with the first units only (slicing),
   so units added later never reach it.

L1 and the group lasso are proximal soft-threshold steps (lr * weight) after each optimizer step,
as in the code. Each phase starts a fresh optimizer; entries a phase does not train get no
gradient and are restored after each step. Departures from the code: softmax cross-entropy
(the code: sigmoid BCE on one-vs-rest tasks), selection reads every head column (the code reads
the first only), no l2 weight decay and no lr decay. Old units are only L2-regularised, so DEN
forgets except for split units and timestamps.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Footprint, Method
from clrun.models import build_backbone
from clrun.models.backbones import MLP
from clrun.train import fit


def uniform(rows: int, cols: int, device) -> torch.Tensor:
    """nn.Linear's default initialisation for a (rows, cols) weight: U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols, device=device).uniform_(-bound, bound)


def forward(x: torch.Tensor, weights, biases, head, widths: list[int] | None = None) -> torch.Tensor:
    """Logits through the hidden layers' first `widths` units (None: all) and `head` (weight, bias)."""
    h = x.flatten(1)
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        n = len(b) if widths is None else widths[layer]
        h = F.relu(F.linear(h, w[:n, : h.shape[1]], b[:n]))
    return F.linear(h, head[0][:, : h.shape[1]], head[1])


class DEN(Method):
    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        backbone = build_backbone(backbone_cfg, stream.input_shape)
        linears = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
        if type(backbone) is not MLP or not linears:
            raise ClrunError("method den grows fully connected layers: it needs backbone=mlp with hidden layers")
        self.weights = [m.weight.detach().clone().to(hw.device) for m in linears]
        self.biases = [m.bias.detach().clone().to(hw.device) for m in linears]
        self.base_params = sum(w.numel() + b.numel() for w, b in zip(self.weights, self.biases, strict=True))
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # per task: weight, bias
        self.widths: list[list[int]] = []  # per task: each hidden layer's width at its timestamp
        self.events: list[dict] = []  # per task: units added, pruned, split

    # ---- one training phase ------------------------------------------------------------
    def phase(self, task: Task, head: int, trainable, drift: bool = False, group: list | None = None) -> float:
        """Train the entries `trainable` marks (a bool mask per weight, bias, then head weight and bias; None: frozen)
        with L1 (and the drift term, and the group lasso on the rows `group` marks per layer); return the loss."""
        cfg = self.cfg
        n = len(self.weights)
        tensors = [*self.weights, *self.biases, *self.heads[head]]
        start = [t.clone() for t in tensors]
        params = [nn.Parameter(t.clone()) for t in tensors]
        chosen = [
            (p, m, s, i) for i, (p, m, s) in enumerate(zip(params, trainable, start, strict=True)) if m is not None
        ]
        shrink_l1 = cfg.train.lr * cfg.mu

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = F.cross_entropy(forward(x, params[:n], params[n : 2 * n], params[2 * n :]), y)
            if drift:
                value = value + cfg.drift * sum(((p - s)[m] ** 2).sum() for p, m, s, i in chosen if i < 2 * n)
            return value

        def after_backward(_) -> None:
            for p, m, _, _ in chosen:
                p.grad.mul_(m)

        def after_step(_) -> None:
            with torch.no_grad():
                for p, m, s, i in chosen:
                    value = p
                    if i < n or i == 2 * n:  # weights (not biases): L1
                        value = value.sign() * (value.abs() - shrink_l1).clamp(min=0)
                    if group is not None and i < n:  # new units' incoming weights: group lasso
                        norms = value.norm(dim=1, keepdim=True).clamp(min=1e-12)
                        scaled = value * (1 - cfg.train.lr * cfg.group_lasso / norms).clamp(min=0)
                        value = torch.where(group[i][:, None], scaled, value)
                    p.copy_(torch.where(m, value, s))

        stats = fit(
            nn.ParameterList(params),
            [p for p, *_ in chosen],
            loss,
            (task.train.x, task.train.y),
            cfg.train,
            self.stream,
            self.hw,
            None,
            f"task {task.index} {task.name}",
            after_backward=after_backward,
            after_step=after_step,
        )
        self.weights = [p.detach() for p in params[:n]]
        self.biases = [p.detach() for p in params[n : 2 * n]]
        self.heads[head] = (params[2 * n].detach(), params[2 * n + 1].detach())
        self.stats.append(stats)
        return stats.loss

    def masks(self, rows: list[torch.Tensor], cols: list | None = None) -> list:
        """Trainable masks for weights (rows[l] x cols[l-1], the first layer: every input) and biases (rows[l]),
        plus the whole head."""
        weights = []
        for layer, r in enumerate(rows):
            c = torch.ones(self.weights[layer].shape[1], dtype=torch.bool, device=r.device)
            if layer and cols is not None:
                c = cols[layer - 1]
            weights.append(r[:, None] & c[None, :])
        head = self.heads[-1]
        return [*weights, *rows, torch.ones_like(head[0], dtype=torch.bool), torch.ones_like(head[1], dtype=torch.bool)]

    # ---- structural edits ----------------------------------------------------------------
    def add_units(self, layer: int, rows: torch.Tensor, bias: torch.Tensor, head_cols: torch.Tensor | None) -> None:
        """Append units to `layer` with incoming weights `rows` and `bias`; the next layer's new column is 0, the
        head's (top layer) `head_cols` (None: U init)."""
        self.weights[layer] = torch.cat([self.weights[layer], rows])
        self.biases[layer] = torch.cat([self.biases[layer], bias])
        added = len(rows)
        if layer + 1 < len(self.weights):
            w = self.weights[layer + 1]
            self.weights[layer + 1] = torch.cat([w, w.new_zeros(len(w), added)], dim=1)
        else:
            w, b = self.heads[-1]
            if head_cols is None:
                head_cols = uniform(len(w), w.shape[1] + added, w.device)[:, -added:]
            self.heads[-1] = (torch.cat([w, head_cols], dim=1), b)

    def remove_units(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only the units of `layer` that `keep` marks (and their columns above)."""
        self.weights[layer] = self.weights[layer][keep]
        self.biases[layer] = self.biases[layer][keep]
        if layer + 1 < len(self.weights):
            self.weights[layer + 1] = self.weights[layer + 1][:, keep]
        else:
            self.heads[-1] = (self.heads[-1][0][:, keep], self.heads[-1][1])

    def expand(self, task: Task) -> tuple[int, int]:
        """Add k units per layer, train them with L1 + group lasso, delete those whose weights went to zero;
        return the units added and deleted."""
        device, k = self.hw.device, self.cfg.k
        for layer in range(len(self.weights)):  # in order: new units read from every unit below, new ones included
            inputs = self.weights[layer].shape[1]
            self.add_units(layer, uniform(k, inputs, device), torch.zeros(k, device=device), None)
        rows = [torch.arange(len(b), device=device) >= len(b) - k for b in self.biases]
        self.phase(task, len(self.heads) - 1, self.masks(rows), group=rows)
        deleted = 0
        for layer in range(len(self.weights)):
            keep = ~(rows[layer] & (self.weights[layer] == 0).all(1))
            deleted += int((~keep).sum())
            self.remove_units(layer, keep)
        return k * len(self.weights), deleted

    def split(self, task: Task, old_weights: list, old_biases: list, old: list[int]) -> int:
        """Duplicate up to k drifted old units per layer (the copy keeps the new weights, the unit its old ones);
        retrain the task's units and the head; return the units split."""
        split = 0
        for layer in range(len(self.weights)):
            w, b = self.weights[layer], self.biases[layer]
            before = old_weights[layer]
            drifts = (w[: old[layer], : before.shape[1]] - before).norm(dim=1)
            order = drifts.argsort(descending=True)[: self.cfg.k]
            units = order[drifts[order] > self.cfg.sigma]
            if not len(units):
                continue
            split += len(units)
            head_cols = None
            if layer + 1 == len(self.weights):
                head_cols = self.heads[-1][0][:, units].clone()
                self.heads[-1][0][:, units] = 0
            rows, bias = w[units].clone(), b[units].clone()
            w[units] = 0
            w[units, : before.shape[1]] = before[units]
            b[units] = old_biases[layer][units]
            self.add_units(layer, rows, bias, head_cols)
            if layer + 1 < len(self.weights):  # units created in this task above read the copy as they read the unit
                above = self.weights[layer + 1]
                above[old[layer + 1] :, -len(units) :] = above[old[layer + 1] :, units]
        if split:
            rows = [torch.arange(len(b), device=b.device) >= n for b, n in zip(self.biases, old, strict=True)]
            self.phase(task, len(self.heads) - 1, self.masks(rows))
        return split

    # ---- learning ------------------------------------------------------------------------
    def learn(self, task: Task, progress) -> dict:
        device = self.hw.device
        top = len(self.biases[-1])
        self.heads.append((uniform(task.n_classes, top, device), torch.zeros(task.n_classes, device=device)))
        head = len(self.heads) - 1
        everything = [torch.ones(len(b), dtype=torch.bool, device=device) for b in self.biases]
        event = {"added": 0, "pruned": 0, "split": 0}
        self.stats = []  # this task's phases
        if task.index == 0:
            self.phase(task, head, self.masks(everything))
        else:
            old = [len(b) for b in self.biases]
            old_weights = [w.clone() for w in self.weights]
            old_biases = [b.clone() for b in self.biases]
            head_only = [None] * (2 * len(self.weights)) + self.masks(everything)[-2:]
            self.phase(task, head, head_only)
            selected = [None] * len(self.weights)  # breadth-first from the head over non-zero weights
            selected[-1] = (self.heads[head][0] != 0).any(0)
            for layer in range(len(self.weights) - 1, 0, -1):
                selected[layer - 1] = (self.weights[layer][selected[layer]] != 0).any(0)
            loss = self.phase(task, head, self.masks(selected, cols=selected), drift=True)
            if loss > self.cfg.tau and self.cfg.k > 0:
                event["added"], event["pruned"] = self.expand(task)
            event["split"] = self.split(task, old_weights, old_biases, old)
        self.widths.append([len(b) for b in self.biases])
        self.events.append(event)
        seconds = sum(s.seconds for s in self.stats)
        row = {
            "epochs": sum(s.epochs for s in self.stats),
            "train_s": seconds,
            "images_per_s": sum(s.images for s in self.stats) / seconds if seconds > 0 else float("nan"),
            "train_loss": self.stats[-1].loss,
        }
        return {**row, **event}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return forward(x, self.weights, self.biases, self.heads[task], self.widths[task])

    # ---- accounting and persistence --------------------------------------------------------
    def summary(self) -> dict:
        return {
            "units": sum(len(b) for b in self.biases),
            "split": sum(e["split"] for e in self.events),
            "pruned": sum(e["pruned"] for e in self.events),
        }

    def state_dict(self) -> dict:
        return {
            "weights": self.weights,
            "biases": self.biases,
            "heads": [list(h) for h in self.heads],
            "widths": self.widths,
            "events": self.events,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.hw.device
        self.weights = [w.to(device) for w in state["weights"]]
        self.biases = [b.to(device) for b in state["biases"]]
        self.heads = [(w.to(device), b.to(device)) for w, b in state["heads"]]
        self.widths = [list(w) for w in state["widths"]]
        self.events = [dict(e) for e in state["events"]]

    def footprint(self) -> Footprint:
        """The final network (split copies included), every head, and the widths (timestamps) as bytes."""
        tensors = [*self.weights, *self.biases, *(t for h in self.heads for t in h)]
        params = sum(t.numel() for t in tensors)
        size = sum(t.numel() * t.element_size() for t in tensors) + 8 * sum(len(w) for w in self.widths)
        head0 = self.heads[0][0].shape[0] * (self.heads[0][0].shape[1] + 1) if self.heads else 0
        return Footprint(params=params, bytes=size, base_params=self.base_params + head0)
