"""Weights shared across tasks: owner maps, picking masks, per-task tensors, growth.

The network under PackNet, Piggyback, PAE and CPG. Every weight of a clrun
`Conv2d`/`Linear` in the backbone has an owner (uint8: 0 = free, k = task tag
k, where task index i has tag i + 1). Task k predicts with the weights owned by
tasks <= k, restricted to those its picking mask picked among earlier tasks'
weights, at its own width, with its own batch norm, biases, PReLU and head.
The weights of earlier tasks never move: the forward pass detaches them, so
their gradients are exactly zero (no momentum or Adam moment can build up), and
weight decay is added to the current task's weights only (`own_weight_decay`).
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from clrun.errors import ClrunError
from clrun.models.heads import MultiHead
from clrun.models.layers import Conv2d, Linear

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # batch-norm statistics: stored, not parameters


def shared_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The backbone layers whose weights are shared between tasks, by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (Conv2d, Linear))}


class MaskedWeight(torch.autograd.Function):
    """The current task's weight in one function: `weight * keep` (own and earlier tasks' weights; a weight times 0
    elsewhere; `keep` None where no weight is either, so the weight is used as it is), and with a picking mask `pick`
    (one entry per flat index `old` of an earlier task's weight, whose values are `old_weights`: gathered once per
    task, as earlier weights never move) the earlier weights times binarize(pick): 1 where `pick` > `threshold` else
    0, as `(hard + pick) - pick`.
    Backward: the gradient plus `decay` times the weight (L2 weight decay), times `own`, to the weight (earlier
    weights never move), the gradient times the earlier weights to `pick` (straight through the threshold).
    Bit-identical to the unfused expression `weight * own + weight.detach() * old_mask * (hard + pick -
    pick.detach())` with `decay * weight * own` added to the weight's gradient after the backward pass (zeros may
    differ in sign where `own` is 0, which no optimizer step turns into a change of weight)."""

    @staticmethod
    def forward(ctx, weight, own, keep, old, old_weights, pick, threshold, decay):
        if keep is not None:
            out = weight * keep
        else:  # as it is; a copy where picking writes into it
            out = weight if pick is None else weight.clone()
        if pick is not None:
            hard = (pick > threshold).to(pick.dtype)
            out.put_(old, hard.add_(pick).sub_(pick).mul_(old_weights))
        ctx.decay = decay
        ctx.save_for_backward(own, old, old_weights, weight if decay else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        own, old, old_weights, weight = ctx.saved_tensors
        grad_pick = torch.take(grad, old).mul_(old_weights) if ctx.needs_input_grad[5] else None
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = _plus_decay(grad, weight, ctx.decay).mul_(own) if ctx.decay else grad * own
        return grad_weight, None, None, None, None, grad_pick, None, None


def _plus_decay(grad: torch.Tensor, weight: torch.Tensor, decay: float) -> torch.Tensor:
    """`grad + decay * weight`: eagerly as torch.add with `alpha` (one rounding, as L2 decay added to `.grad` was);
    compiled as a product and a sum, since torch.compile (torch 2.14) takes an `alpha` read from the autograd
    context as 1."""
    if torch.compiler.is_compiling():
        return grad + weight * decay
    return torch.add(grad, weight, alpha=decay)


def _masked_weight(layer: nn.Module) -> torch.Tensor:
    """The current task's weight: its own weights trained, earlier tasks' weights frozen and (optionally) picked."""
    return MaskedWeight.apply(
        layer.weight,
        layer.own_mask,
        layer.keep_mask,
        layer.old,
        layer.old_weights,
        layer.pick,
        layer.threshold,
        layer.decay,
    )


def _slice(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The top-left block of `tensor` with `shape` (an earlier, narrower task's view)."""
    return tensor[tuple(slice(0, n) for n in shape)]


def _to_device(value, device: torch.device):
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


class SharedNet(nn.Module):
    """A backbone whose weights tasks own, pick and grow, plus one head per task.

    `build(channel_multiplier)` makes a fresh backbone; growth to a parameter
    multiplier m rebuilds it with channels times sqrt(m) (CPG's convention) and
    copies the old tensors into the top-left block.
    """

    def __init__(self, build: Callable[[float], nn.Module]):
        super().__init__()
        self.build = build
        self.multiplier = 1.0
        self.backbone = self._with_owners(build(1.0))
        self.heads = MultiHead(getattr(self.backbone, "init", "torch"))  # `build_backbone`'s rule
        self.records: list[dict] = []  # per learned task: multiplier, private tensors, picks
        self.base_params = sum(p.numel() for p in self.backbone.parameters())
        self._view: tuple[int, nn.Module] | None = None  # (task index, backbone view) cached for predict
        self.picking = False  # whether the task being learned picks among earlier tasks' weights

    @staticmethod
    def _with_owners(backbone: nn.Module) -> nn.Module:
        if any(isinstance(m, nn.RNNBase) for m in backbone.modules()):
            raise ClrunError("backbone.name=lstm: weight sharing masks conv and linear layers' weights, not an LSTM's")
        for layer in shared_layers(backbone).values():
            layer.register_buffer("owner", torch.zeros_like(layer.weight, dtype=torch.uint8))
            layer.pick = layer.old = layer.old_weights = None
            layer.decay = 0.0
        return backbone

    def _shared_keys(self) -> set[str]:
        suffixes = ("weight", "owner", "pick")
        return {f"{name}.{suffix}" for name in shared_layers(self.backbone) for suffix in suffixes}

    def private_state(self) -> dict[str, torch.Tensor]:
        """Copies of every backbone tensor that is not a shared weight, owner or pick: batch norm, biases, PReLU."""
        shared = self._shared_keys()
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items() if k not in shared}

    def private_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters each task trains for itself (batch norm affine, biases, PReLU)."""
        shared = {id(p) for layer in shared_layers(self.backbone).values() for p in (layer.weight, layer.pick)}
        return [p for p in self.backbone.parameters() if id(p) not in shared]

    def shared_weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in shared_layers(self.backbone).values()]

    # ---- learning a task -------------------------------------------------------------
    def begin_task(self, tag: int, picking: bool, mask_init: float = 1e-2, threshold: float = 5e-3) -> None:
        """Give the free weights to task `tag` and route the forward pass through its masks.

        With `picking`, the task learns a real-valued mask over earlier tasks' weights, initialised to
        `mask_init` (above `threshold`, so every old weight starts picked) and binarised at `threshold`.
        """
        self.mask_init, self.picking = mask_init, picking
        for layer in shared_layers(self.backbone).values():
            layer.owner[layer.owner == 0] = tag
            layer.threshold = threshold
            layer.weight_fn = _masked_weight
        self.refresh_masks(tag)
        for layer in shared_layers(self.backbone).values():  # one entry per pickable weight: Adam's state as small
            layer.pick = nn.Parameter(layer.weight.new_full(layer.old.shape, mask_init)) if picking else None
        self._view = None

    def refresh_masks(self, tag: int) -> None:
        """Recompute the precomputed masks after the owner map changed: own weights, own and earlier ones, and
        (picking) the flat indices of the earlier ones, which the picking mask covers, and their values (fixed for
        the task: earlier tasks' weights never move)."""
        for layer in shared_layers(self.backbone).values():
            own = layer.owner == tag
            old = (layer.owner >= 1) & (layer.owner < tag)
            layer.own_mask = own.to(layer.weight.dtype)
            keep = own | old
            layer.keep_mask = None if bool(keep.all()) else keep.to(layer.weight.dtype)  # None: nothing masked out
            layer.old = old.flatten().nonzero().squeeze(1) if self.picking else None
            layer.old_weights = None if layer.old is None else torch.take(layer.weight.detach(), layer.old)

    def picks(self) -> list[nn.Parameter]:
        return [layer.pick for layer in shared_layers(self.backbone).values() if layer.pick is not None]

    def reset_picks(self) -> None:
        """Re-initialise the current task's picking masks to their initial value (CPG's retrain pass)."""
        with torch.no_grad():
            for pick in self.picks():
                pick.fill_(self.mask_init)

    def own_weight_decay(self, weight_decay: float) -> None:
        """From now on, the backward pass adds L2 weight decay to the gradients of the current task's own weights
        only (CPG), in the pass that masks them."""
        for layer in shared_layers(self.backbone).values():
            layer.decay = weight_decay

    def prune(self, tag: int, sparsity: float) -> None:
        """Release, per layer, the smallest-magnitude weights of task `tag` so that a fraction `sparsity`
        of its pool (its own weights and the free ones) is free (PackNet / CPG's `_pruning_mask`)."""
        for layer in shared_layers(self.backbone).values():
            pool = (layer.owner == tag) | (layer.owner == 0)
            k = round(sparsity * int(pool.sum()))
            if k == 0:
                continue
            magnitude = torch.where(layer.owner == tag, layer.weight.detach().abs(), torch.zeros_like(layer.weight))
            cutoff = magnitude[pool].kthvalue(k).values
            layer.owner[(layer.owner == tag) & (magnitude <= cutoff)] = 0
        self.refresh_masks(tag)

    def end_task(self, tag: int) -> dict:
        """Freeze task `tag`: store its multiplier, private tensors and binary picks; zero released weights."""
        record = {"multiplier": self.multiplier, "private": self.private_state(), "pick": {}}
        with torch.no_grad():
            for name, layer in shared_layers(self.backbone).items():
                layer.weight[layer.owner == 0] = 0.0  # released weights restart from 0 (CPG, PackNet)
                if layer.pick is not None:
                    picked = torch.zeros_like(layer.owner, dtype=torch.bool)
                    record["pick"][name] = picked.put_(layer.old, layer.pick.detach() > layer.threshold)
                layer.pick = layer.old = layer.old_weights = None
                layer.weight_fn = None
        self.records.append(record)
        self._view = None
        return record

    # ---- growth ----------------------------------------------------------------------
    def grow(self, multiplier: float) -> None:
        """Widen to parameter multiplier `multiplier`: new weights keep their fresh initialisation and are
        free; every old tensor is copied into the top-left block, so earlier tasks' views are unchanged."""
        wider = self._with_owners(self.build(math.sqrt(multiplier)).to(self.device))
        state = wider.state_dict()
        with torch.no_grad():
            for key, old in self.backbone.state_dict().items():
                _slice(state[key], old.shape).copy_(old)
        self.backbone = wider
        self.multiplier = multiplier
        self._view = None

    def rebuild(self, multiplier: float) -> None:
        """Replace the backbone by a freshly initialised one at parameter multiplier `multiplier`, all free
        (CPG retrains its first task from scratch when it grows)."""
        self.backbone = self._with_owners(self.build(math.sqrt(multiplier)).to(self.device))
        self.multiplier = multiplier
        self._view = None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ---- prediction ------------------------------------------------------------------
    def task_view(self, index: int) -> nn.Module:
        """A plain backbone computing task `index`'s features: its width, its masked weights, its tensors."""
        if self._view is not None and self._view[0] == index:
            return self._view[1]
        record, tag = self.records[index], index + 1
        with torch.device("meta"):  # structure only: no initialisation, no draw from the RNG
            view = self.build(math.sqrt(record["multiplier"]))
        view = view.to_empty(device=self.device)
        layers = shared_layers(self.backbone)
        state = {}
        for key, target in view.state_dict().items():
            if key in record["private"]:
                state[key] = record["private"][key]
                continue
            name = key.rsplit(".", 1)[0]
            layer = layers[name]
            owner = _slice(layer.owner, target.shape)
            keep = (owner >= 1) & (owner < tag)
            if name in record["pick"]:
                keep &= record["pick"][name]
            keep |= owner == tag
            state[key] = _slice(layer.weight.detach(), target.shape) * keep
        view.load_state_dict(state)
        view.eval()
        self._view = (index, view)
        return view

    def predict(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Logits of a learned task, through its own view of the shared weights."""
        return self.heads(self.task_view(index)(x), index)

    def forward_current(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """Logits of the task being learned (live masks, current width)."""
        return self.heads(self.backbone(x), head)

    def embed(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """A learned verification task's embeddings (`MultiHead.embed`), through its own view."""
        return self.heads.embed(self.task_view(index)(x), index)

    def embed_current(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """The embeddings of the task being learned (live masks, current width)."""
        return self.heads.embed(self.backbone(x), head)

    # ---- accounting and persistence --------------------------------------------------
    def owner_counts(self) -> torch.Tensor:
        """How many weights each tag owns (index 0: free), over all shared layers."""
        counts = torch.zeros(256, dtype=torch.long, device=self.device)
        for layer in shared_layers(self.backbone).values():
            counts += torch.bincount(layer.owner.flatten().long(), minlength=256)
        return counts

    def storage(self) -> tuple[int, int]:
        """(parameters, bytes) that must be stored: shared weights (fp32) and their owner map (uint8),
        each task's private tensors, picking masks as bits, and heads."""
        n_weights = sum(w.numel() for w in self.shared_weights())
        params = n_weights + sum(p.numel() for p in self.heads.parameters())
        size = n_weights * 5 + sum(p.numel() * p.element_size() for p in self.heads.parameters())
        for record in self.records:
            params += sum(t.numel() for k, t in record["private"].items() if not k.endswith(BUFFERS))
            size += sum(t.numel() * t.element_size() for t in record["private"].values())
            size += sum(math.ceil(p.numel() / 8) for p in record["pick"].values())
        return params, size

    def extra_state(self) -> dict:
        return {
            "multiplier": self.multiplier,
            "records": self.records,
            "heads": self.heads.layout(),
        }

    def load(self, state: dict, extra: dict) -> None:
        """Rebuild at the saved width and heads, then load tensors and per-task records."""
        if extra["multiplier"] != self.multiplier:
            self.grow(extra["multiplier"])
        layout = extra.get("heads") or [(i, n, False) for n, i in extra["head_shapes"]]  # head_shapes: before faces
        for in_features, n_classes, verification in layout:
            self.heads.add(in_features, n_classes, verification)
        self.heads.to(self.device)
        self.load_state_dict(state)
        self.records = [_to_device(record, self.device) for record in extra["records"]]
        self._view = None
