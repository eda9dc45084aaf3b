"""CLNP: continual learning via neural pruning (Golkar, Kagan & Cho 2019, arXiv 1903.04476; no official code).

Every hidden unit (or channel) of a chain backbone is free or owned by the task that kept it. Task t:

1. trains the free units (weights and biases into them, their batch norm) and its own head, with an L1
   penalty on the weights into free units; earlier tasks' units are read (transfer) but never move;
2. measures each free unit's mean post-ReLU activation on the task's training images and prunes the
   least active ones: the largest number k whose pruning keeps that accuracy within `margin` of the
   unpruned network's (graceful forgetting; found by bisection, accuracy taken as falling with k);
3. gives the kept units to task t and cuts interference: the weights from units still free into task t's
   units and into its head are zeroed and stay zero, so whatever later tasks do with the free units
   never reaches task t;
4. fine-tunes task t's units and head (`finetune`), then freezes them.
The units left free start the next task from a fresh initialisation.

Task t's logits depend only on units owned by tasks <= t, which no later task moves, so they stay
bit-identical. Departure from the paper: no validation split, so the margin is measured on (the first
`prune_images` of) the task's training images.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, checked
from clrun.data.stream import Split, Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.gating import GatedLayer, Gates, gated_layers
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import FitStats, Step, TrainConfig, accuracy, eval_batches

FREE = -1  # a unit's owner before any task keeps it


@dataclass
class CLNPConfig(PerTaskMethodConfig):
    """CLNP (Golkar et al. 2019): L1-sparsified training, activation-based neuron pruning, interference cut."""

    l1: float = checked(NON_NEGATIVE, 1e-5)  # weight L1 coefficient (sum of |w| into free units) while a task trains
    margin: float = checked(FRACTION, 0.005)  # graceful forgetting: training accuracy the prune may cost
    prune_images: int = checked(AT_LEAST_1, 10000)  # training images the activations and the margin are measured on
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))  # after the prune (no L1)


def largest_prune(n: int, accuracy_of: Callable[[int], float], floor: float) -> int:
    """The largest k in 0..n with `accuracy_of(k) >= floor` (k = 0 always allowed), by bisection."""
    low, high = 0, n
    while low < high:
        mid = (low + high + 1) // 2
        if accuracy_of(mid) >= floor:
            low = mid
        else:
            high = mid - 1
    return low


def batch_norms(backbone: nn.Module, layers: list[GatedLayer]) -> list[nn.Module | None]:
    """Each gated layer's batch norm (between the layer and its activation), or None."""
    norms: list[nn.Module | None] = [None] * len(layers)
    current = None
    for module in backbone.modules():
        current = next((i for i, g in enumerate(layers) if g.layer is module), current)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and current is not None:
            norms[current] = module
    return norms


def entries(layers, norms, rows: list[torch.Tensor], used: list[torch.Tensor] | None) -> list[tuple]:
    """(tensor, mask) for every tensor of the gated `layers` and their `norms`: the entries of `rows` units
    (weights: only those from `used` units of the layer below; None: from every unit)."""
    pairs = []
    for i, (gated, norm) in enumerate(zip(layers, norms, strict=True)):
        weight = gated.layer.weight
        mask = rows[i].view(-1, *[1] * (weight.dim() - 1)).expand_as(weight)
        if used is not None and gated.input_gate is not None:
            columns = used[gated.input_gate].repeat_interleave(gated.input_repeat)
            mask = mask & columns.view(1, -1, *[1] * (weight.dim() - 2)).expand_as(weight)
        pairs.append((weight, mask))
        per_unit = [gated.layer.bias]
        if norm is not None:
            per_unit += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
        pairs += [(t, rows[i]) for t in per_unit if t is not None]
    return pairs


class CLNP(Method):
    config_class = CLNPConfig
    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([], scenario="task")  # a head per task; class/domain go through `task_id`
        self.layers = gated_layers(self.model.backbone, "clnp")
        self.norms = batch_norms(self.model.backbone, self.layers)
        self.gates = Gates(self.layers)
        self.owner = [torch.full((g.units,), FREE, dtype=torch.long, device=hw.device) for g in self.layers]

    def entries(self, rows: list[torch.Tensor], used: list[torch.Tensor] | None) -> list[tuple]:
        return entries(self.layers, self.norms, rows, used)

    def head_inputs(self, head: int, used: list[torch.Tensor]) -> torch.Tensor:
        """Head `head`'s input features coming from `used` units of the last layer."""
        weight = self.model.heads.heads[head].weight
        return used[-1].repeat_interleave(weight.shape[1] // self.layers[-1].units)

    # ---- learning --------------------------------------------------------------------
    def learn(self, task: Task) -> dict:
        cfg, model, t = self.cfg, self.model, task.index
        head = model.add_head(task.n_classes)
        out = model.heads.heads[head]
        if t:
            self.refresh_free_units()
        free = [o == FREE for o in self.owner]
        params = [tensor for tensor, _ in self.entries(free, None) if tensor.requires_grad] + list(out.parameters())
        everything = [(p, torch.ones_like(p, dtype=torch.bool)) for p in out.parameters()]

        def sparse_loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            l1 = sum(g.layer.weight.abs().flatten(1).sum(1)[f].sum() for g, f in zip(self.layers, free, strict=True))
            return F.cross_entropy(model(x, head), y) + cfg.l1 * l1

        phases = [
            self.train_phase(task, params, self.entries(free, None) + everything, sparse_loss, cfg.train, "train")
        ]
        candidates = int(sum(f.sum() for f in free))
        base, after, threshold, pruned = self.prune(task, head, free)
        used = [o != FREE for o in self.owner]
        self.cut(t, head, used)
        mine = [o == t for o in self.owner]
        movable = self.entries(mine, used) + [(out.weight, self.head_inputs(head, used)[None].expand_as(out.weight))]
        movable.append((out.bias, torch.ones_like(out.bias, dtype=torch.bool)))

        def plain_loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            return F.cross_entropy(model(x, head), y)

        phases.append(self.train_phase(task, params, movable, plain_loss, cfg.finetune, "fine-tune"))
        return {
            **FitStats.total(phases).row(),
            "train_loss": phases[0].loss,
            "threshold": threshold,  # the largest pruned unit's mean activation (NaN: none pruned)
            "pruned": pruned / candidates if candidates else math.nan,  # share of the free units pruned
            "prune_cost": base - after,  # training accuracy the prune cost (at most `margin`)
            "free_units": self.free_share(),
        }

    def train_phase(self, task, params, movable, loss, recipe, phase) -> FitStats:
        """Train `params` with `loss`; after every step, every entry outside `movable` is put back."""
        kept = [(t, ~m, t.detach().clone()) for t, m in movable]
        kept += [(t, torch.ones_like(t, dtype=torch.bool), t.detach().clone()) for t in self.unlisted(movable)]

        def restore(step: Step) -> None:
            with torch.no_grad():
                for tensor, frozen, value in kept:
                    tensor.copy_(torch.where(frozen, value, tensor))

        return self.fit(task, self.model, params, loss, recipe, phase, after_step=restore)

    def unlisted(self, movable) -> list[torch.Tensor]:
        """Backbone tensors no mask covers (none in clrun's chain backbones), kept as they are."""
        listed = {id(t) for t, _ in movable}
        state = [*self.model.backbone.parameters(), *self.model.backbone.buffers()]
        return [t for t in state if id(t) not in listed and t.is_floating_point()]

    def refresh_free_units(self) -> None:
        """Give the free units a fresh initialisation (the weights into them, their bias and batch norm)."""
        fresh = build_backbone(self.backbone_cfg, self.stream.input_shape).to(self.hw.device)
        layers = gated_layers(fresh, "clnp")
        free = [o == FREE for o in self.owner]
        new = entries(layers, batch_norms(fresh, layers), free, None)
        with torch.no_grad():
            for (tensor, mask), (value, _) in zip(self.entries(free, None), new, strict=True):
                tensor.copy_(torch.where(mask, value.to(tensor.dtype), tensor))

    @torch.no_grad()
    def prune(self, task: Task, head: int, free: list[torch.Tensor]) -> tuple[float, float, float, int]:
        """Give the task the free units it needs (owner = its index), leaving the least active ones free; return
        the unpruned and pruned training accuracy, the threshold and the number pruned."""
        self.model.eval()
        n = min(self.cfg.prune_images, len(task.train))
        split = Split(task.train.x[:n], task.train.y[:n])
        means = self.mean_activations(split, task.index)
        values = torch.cat([m[f] for m, f in zip(means, free, strict=True)])
        order = values.argsort()
        sizes = [int(f.sum()) for f in free]

        def gates(k: int) -> list[torch.Tensor]:
            """1 for every unit but the k least active free ones."""
            keep = torch.ones(len(values), device=values.device)
            keep[order[:k]] = 0
            result = [torch.ones(len(f), device=values.device) for f in free]
            for gate, f, part in zip(result, free, keep.split(sizes), strict=True):
                gate[f] = part
            return result

        def accuracy_of(k: int) -> float:
            with self.gates.use(gates(k)):
                predict = lambda x: self.model(x, head)  # noqa: E731
                return accuracy(predict, split, self.stream, self.hw, self.cfg.eval_batch_size, task.index)

        base = accuracy_of(0)
        k = largest_prune(len(values), accuracy_of, base - self.cfg.margin)
        for owner, gate, f in zip(self.owner, gates(k), free, strict=True):
            owner[f & (gate > 0)] = task.index
        threshold = values[order[k - 1]].item() if k else math.nan
        return base, accuracy_of(k), threshold, k

    def mean_activations(self, split: Split, task: int) -> list[torch.Tensor]:
        """Each gated unit's mean post-ReLU activation over `split` (and over positions, for channels)."""
        sums = [torch.zeros(g.units, device=self.hw.device) for g in self.layers]

        def record(i: int, output: torch.Tensor) -> None:
            sums[i].add_(output.float().transpose(0, 1).flatten(1).sum(1) / output[0, 0].numel())

        hooks = [
            g.activation.register_forward_hook(lambda m, a, out, i=i: record(i, out)) for i, g in enumerate(self.layers)
        ]
        try:
            for x, _ in eval_batches((split.x, split.y), self.stream, self.hw, self.cfg.eval_batch_size, task):
                with self.hw.autocast():
                    self.model.backbone(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [s / len(split) for s in sums]

    @torch.no_grad()
    def cut(self, task: int, head: int, used: list[torch.Tensor]) -> None:
        """Zero the weights from units still free into task `task`'s units and into its head."""
        mine = [o == task for o in self.owner]
        for (tensor, rows), (_, kept) in zip(self.entries(mine, None), self.entries(mine, used), strict=True):
            tensor.masked_fill_(rows & ~kept, 0)
        out = self.model.heads.heads[head]
        out.weight[:, ~self.head_inputs(head, used)] = 0

    # ---- prediction, accounting and persistence --------------------------------------
    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        return self.model(x, task)

    def free_share(self) -> float:
        """Share of hidden units still free."""
        return sum(int((o == FREE).sum()) for o in self.owner) / sum(g.units for g in self.layers)

    def summary(self) -> dict:
        return {"free_units": self.free_share()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "owner": self.owner, "n_tasks": len(self.model.heads.heads)}

    def load_state_dict(self, state: dict) -> None:
        for task in self.stream.tasks[len(self.model.heads.heads) : state["n_tasks"]]:
            self.model.add_head(task.n_classes)
        self.model.load_state_dict(state["model"])
        self.owner = [o.to(self.hw.device) for o in state["owner"]]

    def footprint(self) -> Footprint:
        """One backbone and a head per task, and each unit's owner (bytes)."""
        base = count_params(self.model.backbone) + count_params(self.model.heads.heads[0])
        size = module_bytes(self.model) + tensor_bytes(self.owner)
        return Footprint(params=count_params(self.model), bytes=size, base_params=base)
