"""Importance regularisation: a quadratic penalty that ties each parameter to its values at earlier tasks' ends.

EWC, online EWC, SI and MAS differ only in how they measure a parameter's
importance and how many (importance, anchor) pairs they keep; the penalty
while learning a task is `weight * sum_k sum_i importance_k,i (theta_i - anchor_k,i)^2`.
Importance and anchors are kept per parameter name, for the parameters trained
on the task they come from: a head added later has no anchor, and a head left
untouched (task scenario) has no term.
"""

from collections.abc import Callable
from itertools import chain

import torch
from torch.func import functional_call, jacrev, vmap

from clrun.data import prepare
from clrun.data.stream import Task
from clrun.methods.base import Footprint, SharedModelMethod, task_loss
from clrun.models.layers import Linear
from clrun.train import fit

Tensors = dict[str, torch.Tensor]

LINEAR_CHUNK = 1024  # samples per forward pass when estimating importance
CHUNK_FLOATS = 2**24  # at most this many floats of per-sample gradients at once (torch.func path)


def tensor_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Quadratic(torch.autograd.Function):
    """sum importance * (theta - anchor)^2, its gradient 2 importance (theta - anchor) kept from the forward pass
    (half the memory passes of plain autograd: the penalty runs every step over every parameter)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, importance: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        difference = theta - anchor
        weighted = importance * difference
        ctx.save_for_backward(weighted)
        return torch.dot(weighted.flatten(), difference.flatten())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weighted,) = ctx.saved_tensors
        return 2 * grad * weighted, None, None


class Regularization(SharedModelMethod):
    """A shared model trained with a quadratic penalty towards anchors; subclasses say how the
    (importance, anchor) terms are measured (`consolidate`) and how strongly they pull (`penalty_weight`)."""

    after_step: Callable[[int], None] | None = None  # `fit`'s after-step hook (SI accumulates its path integral)

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.importance: list[Tensors] = []
        self.anchors: list[Tensors] = []

    @property
    def penalty_weight(self) -> float:
        raise NotImplementedError

    def consolidate(self, task: Task, trained: dict[str, torch.nn.Parameter]) -> None:
        """After training on `task`: update the (importance, anchor) terms from the `trained` parameters."""
        raise NotImplementedError

    def begin(self, trained: dict[str, torch.nn.Parameter]) -> None:
        """Before training on a task: the parameters it trains (nothing to do by default)."""

    def loss(self, task: Task):
        """The data term of the loss while learning `task` (a `fit` loss function)."""
        return task_loss(self.model, task.index, self.stream)

    def trained_parameters(self, head: int) -> list[torch.nn.Parameter]:
        """What learning the task with head `head` trains (as finetune: earlier heads stay out in the task scenario)."""
        return self.model.trainable(head)

    def output_head(self, task: Task) -> int | None:
        """The head argument giving the task's output as the scenario defines it: the task's head (task),
        every class seen so far (class: None), the shared head (domain: None)."""
        return task.index if self.stream.scenario == "task" else None

    def fold(self) -> tuple[Tensors, Tensors, float]:
        """The terms as one: sum_k I_k (theta - a_k)^2 = I (theta - a)^2 + m per parameter, with I = sum_k I_k,
        a = sum_k I_k a_k / I and m = sum_k I_k (a_k - a)^2 (the same penalty and gradient, one term to compute)."""
        if len(self.importance) <= 1:
            return (self.importance or [{}])[0], (self.anchors or [{}])[0], 0.0
        total, weighted = {}, {}
        for importance, anchor in zip(self.importance, self.anchors, strict=True):
            for name, value in importance.items():
                total[name] = total.get(name, 0) + value
                weighted[name] = weighted.get(name, 0) + value * anchor[name]
        mean = {name: weighted[name] / total[name].clamp_min(torch.finfo(total[name].dtype).tiny) for name in total}
        minimum = sum(
            (value * (anchor[name] - mean[name]).square()).sum().item()
            for importance, anchor in zip(self.importance, self.anchors, strict=True)
            for name, value in importance.items()
        )
        return total, mean, minimum

    def penalty(self, folded: tuple[Tensors, Tensors, float] | None = None) -> torch.Tensor:
        """weight * sum over terms and anchored parameters of importance * (theta - anchor)^2 (from `fold()`)."""
        importance, anchor, minimum = folded or self.fold()
        params = dict(self.model.named_parameters())
        total = sum(Quadratic.apply(params[name], value, anchor[name]) for name, value in importance.items())
        return self.penalty_weight * (total + minimum)

    def learn(self, task: Task, progress) -> dict:
        head = self.model.add_head(task.n_classes)
        params = self.trained_parameters(head)
        ids = {id(p) for p in params}
        trained = {name: p for name, p in self.model.named_parameters() if id(p) in ids}
        self.begin(trained)
        data_loss = self.loss(task)
        folded = self.fold()

        def loss(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            value = data_loss(x, *rest)
            return value + self.penalty(folded) if self.importance else value

        stats = fit(
            self.model,
            params,
            loss,
            (task.train.x, task.train.y),
            self.cfg.train,
            self.stream,
            self.hw,
            progress,
            f"task {task.index} {task.name}",
            after_step=self.after_step,
        )
        self.consolidate(task, trained)
        return stats.row()

    def sample_images(self, task: Task, n: int | None) -> torch.Tensor:
        """`n` of the task's training images drawn at random without replacement (None or more: all, in order)."""
        x = task.train.x
        if n is None or n >= len(x):
            return x
        return x[torch.randperm(len(x))[:n].to(x.device)]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float model inputs from uint8 images, without augmentation."""
        return self.hw.to_input(prepare(images, self.stream.mean, self.stream.std, augment=False))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "importance": self.importance, "anchors": self.anchors}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.hw.device
        self.importance = [{n: t.to(device) for n, t in term.items()} for term in state["importance"]]
        self.anchors = [{n: t.to(device) for n, t in term.items()} for term in state["anchors"]]

    def footprint(self) -> Footprint:
        """The model plus every stored importance and anchor tensor (bytes)."""
        footprint = super().footprint()
        stored = sum(tensor_bytes(term) for term in chain(self.importance, self.anchors))
        return Footprint(footprint.params, footprint.bytes + stored, footprint.base_params)


def sample_mean(
    model: torch.nn.Module,
    names: list[str],
    images: torch.Tensor,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    head: int | None,
    outputs: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    phi: Callable[[torch.Tensor], torch.Tensor],
) -> Tensors:
    """Per parameter in `names`: the mean over `images` of sum_k w_k phi(d s_k / d theta), one gradient per sample,
    in eval mode and fp32; (s, w) = outputs(logits) are (N, K) per-sample scalars and their weights (w detached),
    logits = model(x, head), and phi is |.| or its square (so that phi(a b) = phi(a) phi(b)).

    A clrun Linear layer's per-sample weight gradient is the outer product of the gradient at its output and its
    input, so phi of it sums over samples as one matrix product (no per-sample gradient is stored: fast on CPU).
    Other parameters (convolutions, batch norm) get per-sample gradients from torch.func (vmap of jacrev) in
    chunks of at most CHUNK_FLOATS floats.
    """
    was_training = model.training
    model.eval()
    named = dict(model.named_parameters())
    linear = {
        prefix: m
        for prefix, m in model.named_modules()
        if isinstance(m, Linear) and m.weight_fn is None and f"{prefix}.weight" in names
    }
    factored = {f"{prefix}.{kind}" for prefix in linear for kind in ("weight", "bias")}
    others = [name for name in names if name not in factored]
    totals = {name: torch.zeros_like(named[name], dtype=torch.float32) for name in names}
    with torch.no_grad():
        n_outputs = outputs(model(to_input(images[:1]), head).float())[0].shape[1]
    chunk = max(1, min(LINEAR_CHUNK, CHUNK_FLOATS // (3 * n_outputs * max(1, sum(named[n].numel() for n in others)))))
    for start in range(0, len(images), chunk):
        x = to_input(images[start : start + chunk])
        if linear:
            _add_linear(model, linear, names, x, head, outputs, phi, totals)
        if others:
            for name, value in _per_sample(model, others, x, head, outputs, phi).items():
                totals[name] += value.sum(0)
    model.train(was_training)
    return {name: total / len(images) for name, total in totals.items()}


def _add_linear(model, linear: dict, names: list[str], x, head, outputs, phi, totals: Tensors) -> None:
    """Add the batch's sum_n sum_k w_nk phi(gradient) of the linear layers' weights and biases to `totals`."""
    seen = {}

    def capture(prefix: str, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        seen[prefix] = (inputs[0].detach().clone(), out)
        return out.clone()  # the layer's output to the next layers: in-place ops (ReLU) there leave `out` intact

    hooks = [
        m.register_forward_hook(lambda _, inputs, out, prefix=prefix: capture(prefix, inputs, out))
        for prefix, m in linear.items()
    ]
    try:
        s, w = outputs(model(x, head).float())
    finally:
        for hook in hooks:
            hook.remove()
    prefixes = list(seen)
    for k in range(s.shape[1]):
        grads = torch.autograd.grad(
            s[:, k].sum(), [seen[p][1] for p in prefixes], retain_graph=k < s.shape[1] - 1, allow_unused=True
        )
        for prefix, grad_out in zip(prefixes, grads, strict=True):
            if grad_out is None:  # a layer off the output's path
                continue
            weighted = w[:, k, None] * phi(grad_out.float())  # samples are independent in eval mode
            totals[f"{prefix}.weight"] += weighted.T @ phi(seen[prefix][0].float())
            if f"{prefix}.bias" in names:
                totals[f"{prefix}.bias"] += weighted.sum(0)


def _per_sample(model, names: list[str], x, head, outputs, phi) -> Tensors:
    """Per sample of `x` (vmapped): sum_k w_k phi(d s_k / d theta) of the parameters `names`, the rest fixed."""
    params = {name: p.detach() for name, p in model.named_parameters() if name in names}
    fixed = {
        name: t.detach() for name, t in chain(model.named_parameters(), model.named_buffers()) if name not in params
    }

    def one_sample(params: Tensors, x: torch.Tensor) -> Tensors:
        def scalars(params: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
            s, w = outputs(functional_call(model, {**fixed, **params}, (x.unsqueeze(0), head)).float())
            return s[0], w[0]

        jacobians, w = jacrev(scalars, has_aux=True)(params)
        return {name: torch.tensordot(w, phi(j), dims=1) for name, j in jacobians.items()}

    return vmap(one_sample, in_dims=(None, 0))(params, x)
