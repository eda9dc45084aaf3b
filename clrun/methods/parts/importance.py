"""Importance penalties: a quadratic penalty that ties each parameter to its values at earlier tasks' ends.

EWC, online EWC, SI and MAS (and XdG with `regularizer: ewc | si`) differ only in how they measure a parameter's
importance and how many (importance, anchor) terms they keep; the penalty while learning a task is
`weight * sum_k sum_i importance_k,i (theta_i - anchor_k,i)^2`, kept as one term (I, a, m):
`weight * (sum_i I_i (theta_i - a_i)^2 + m)`. Importance and anchors are kept per parameter name, for the parameters
trained on the task they come from: a head added later has no anchor, and a head left untouched (task scenario) has
no term. While a task trains, the terms of parameters it does not train (earlier tasks' heads) are a constant,
computed once: a step's cost does not grow with the tasks before it.

- `FisherPenalty` (EWC, Kirkpatrick et al. 2017; online EWC, Schwarz et al. 2018, as van de Ven et al. run them,
  GMvandeVen/continual-learning): the Fisher from the model's own predictions, in eval mode, per sample, on the
  task's output as the scenario defines it. `fisher_labels: predicted`: F_i = mean_x (d log p(c*|x) /
  d theta_i)^2 at the predicted class c* (van de Ven's 2019 code, behind the published MNIST tables);
  `expectation`: F_i = mean_x sum_c p(c|x) (d log p(c|x) / d theta_i)^2 (his 2022 code; larger for confident
  models, so lambda does not carry over). He divides the sum by N-1 on a full pass; this takes the mean.
  Offline: one term (lambda/2) F_j (theta - theta*_j)^2 per earlier task j, kept folded into one quadratic
  (`Penalty.add`: sum_j F_j, the F-weighted mean anchor and the minimum), so that a step costs the same at task 50
  as at task 2; equal to the separate terms up to float rounding (not bit for bit). Online: one running Fisher
  F <- gamma F + F_t anchored at the last task, penalty (lambda/2) gamma F (theta - theta*)^2 (Schwarz et al.'s
  published form, which van de Ven's code follows too).
- `PathIntegralPenalty` (SI, Zenke, Poole & Ganguli 2017, as van de Ven runs it): every step adds
  W_i -= g_i (theta_i after - theta_i before); at the task's end omega_i += W_i / (delta_i^2 + epsilon), delta the
  change over the task, and the anchor moves to the current parameters; penalty c omega (theta - anchor)^2 (no
  1/2). g is the total loss's gradient (van de Ven's code, behind the published numbers); `task_gradient: true`
  uses the task loss's alone as Zenke et al.'s code does, by subtracting the penalty's closed-form gradient
  2 c omega (theta - anchor). Neither applies Zenke et al.'s ReLU clamp on omega (van de Ven does not).
- `MASPenalty` (MAS, Aljundi et al. 2018): importance = the mean over the task's images of
  |d ||f(x)||^2 / d theta|, f the task's output (logits) in eval mode, per sample as the paper defines it
  (rahafaljundi/MAS-Memory-Aware-Synapses squares the L2 norm in eval mode too, but of batch gradients; FACIL
  and Avalanche use the unsquared norm in train mode); it adds up over tasks (the original's sum, not FACIL's
  alpha-average); the anchor moves to the current parameters; penalty lambda Omega (theta - anchor)^2.
"""

from collections.abc import Callable
from itertools import chain

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from clrun.data.stream import Stream, Task
from clrun.hardware import Hardware
from clrun.methods.base import task_loss
from clrun.models.layers import Linear
from clrun.results import tensor_bytes
from clrun.train import FitStats, Loss, Step

Tensors = dict[str, torch.Tensor]

LINEAR_CHUNK = 1024  # samples per forward pass when estimating importance
CHUNK_FLOATS = 2**24  # at most this many floats of per-sample gradients at once (torch.func path)


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


def sample_images(task: Task, n: int | None) -> torch.Tensor:
    """`n` of the task's training images drawn at random without replacement (None or more: all, in order)."""
    x = task.train.x
    if n is None or n >= len(x):
        return x
    return x[torch.randperm(len(x))[:n].to(x.device)]


class Penalty:
    """`weight` * (sum_i importance_i (theta_i - anchor_i)^2 + spread): every (importance, anchor) term kept so far
    folded into one (`add`), so that a step costs the same however many tasks came before; a subclass says how a
    task's importance is measured and updates the term (`end`)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.importance: Tensors = {}
        self.anchors: Tensors = {}
        self.spread = 0.0  # the folded terms' minimum over theta (0 for a single term)

    def add(self, importance: Tensors, anchor: Tensors) -> None:
        """Fold one more term in: sum_k I_k (theta - a_k)^2 = I (theta - a)^2 + m per parameter, with I = sum_k I_k,
        a = sum_k I_k a_k / I, and m updated as a weighted variance (m += I_old I_k / I (a_k - a_old)^2), so only
        I, a and m are stored. Equal to the sum of the separate terms up to float rounding (the loss, and for three
        terms or more the gradient: a is recomputed from I_old a_old rather than kept as sum_k I_k a_k)."""
        if not self.importance:
            self.importance, self.anchors = dict(importance), dict(anchor)
            return
        for name in self.importance.keys() | importance.keys():
            old, new = self.importance.get(name, 0), importance.get(name, 0)
            old_anchor, new_anchor = self.anchors.get(name, 0), anchor.get(name, 0)
            total = old + new
            divisor = total.clamp_min(torch.finfo(total.dtype).tiny)
            if name in self.importance and name in importance:
                self.spread += (old * new / divisor * (new_anchor - old_anchor).square()).sum().item()
            self.importance[name] = total
            self.anchors[name] = (old * old_anchor + new * new_anchor) / divisor

    def begin(self, trained: dict[str, torch.nn.Parameter]) -> None:
        """Before training on a task: the parameters it trains (nothing to do by default)."""

    after_step: Callable[[Step], None] | None = None  # `fit`'s after-step hook (SI accumulates its path integral)

    def end(self, model: torch.nn.Module, task: Task, trained: dict[str, torch.nn.Parameter], stream, hw) -> None:
        """After training on `task`: update the term from the `trained` parameters of `model`."""
        raise NotImplementedError

    def fit(self, method, model: torch.nn.Module, task: Task, params: list[torch.nn.Parameter], data_loss: Loss):
        """Train `params` of `model` on `task` through `method.fit` with `data_loss` plus the penalty, then update
        the term; return the `FitStats`."""
        ids = {id(p) for p in params}
        trained = {name: p for name, p in model.named_parameters() if id(p) in ids}
        self.begin(trained)
        terms = self.terms(model, set(trained))

        def loss(x: torch.Tensor, *rest) -> torch.Tensor:
            value = data_loss(x, *rest)
            return value + self.value(terms) if self.importance else value

        stats: FitStats = method.fit(task, model, params, loss, after_step=self.after_step)
        with method.trainer.status(f"task {task.index} {task.name}", "computing the parameters' importance"):
            self.end(model, task, trained, method.stream, method.hw)
        return stats

    def terms(self, model: torch.nn.Module, trained: set[str] | None = None) -> tuple[list, float]:
        """(parameter, importance, anchor) of the penalised parameters in `trained` (None: every one), and the
        constant the others add (they do not move while `trained` trains: earlier tasks' heads) plus the spread."""
        params = dict(model.named_parameters())
        moving = [
            (params[n], i, self.anchors[n]) for n, i in self.importance.items() if trained is None or n in trained
        ]
        fixed = sum(
            Quadratic.apply(params[n].detach(), i, self.anchors[n]).item()
            for n, i in self.importance.items()
            if trained is not None and n not in trained
        )
        return moving, self.spread + fixed

    def value(self, terms: tuple[list, float]) -> torch.Tensor:
        """weight * (sum over `terms()`'s parameters of importance * (theta - anchor)^2 + its constant)."""
        moving, constant = terms
        return self.weight * (sum(Quadratic.apply(p, i, a) for p, i, a in moving) + constant)

    def state_dict(self) -> dict:
        return {"importance": self.importance, "anchors": self.anchors, "spread": self.spread}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if isinstance(state["importance"], list):  # a checkpoint from before the fold: one term per task, folded now
            self.importance, self.anchors, self.spread = {}, {}, 0.0
            for importance, anchor in zip(state["importance"], state["anchors"], strict=True):
                self.add({n: t.to(device) for n, t in importance.items()}, {n: t.to(device) for n, t in anchor.items()})
            return
        self.importance = {n: t.to(device) for n, t in state["importance"].items()}
        self.anchors = {n: t.to(device) for n, t in state["anchors"].items()}
        self.spread = state["spread"]

    def bytes(self) -> int:
        """Bytes of the stored importance and anchor tensors."""
        return tensor_bytes(chain(self.importance.values(), self.anchors.values()))


class Penalised:
    """Mixin of a shared-model method holding a `penalty` (list it before the method's base class): `learn` trains
    the model with the task's loss plus the penalty; the terms are kept in the checkpoint and their bytes counted
    in the footprint."""

    penalty: Penalty

    def learn(self, task: Task) -> dict:
        head = self.model.add_head(task.n_classes)
        loss = task_loss(self.model, task.index, self.stream)
        return self.penalty.fit(self, self.model, task, self.model.trainable(head), loss).row()

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.penalty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.penalty.load_state_dict(state, self.hw.device)

    def footprint(self):
        """The base class's footprint plus every stored importance and anchor tensor (bytes)."""
        return super().footprint().plus(self.penalty.bytes())


def _test_inputs(stream: Stream, hw: Hardware, task: Task) -> Callable[[torch.Tensor], torch.Tensor]:
    """Float model inputs from uint8 images of `task`, without augmentation."""
    return lambda images: hw.to_input(stream.prepare(images, train=False, task=task.index))


def _output_head(task: Task, stream: Stream) -> int | None:
    """The head argument giving the task's output as the scenario defines it: the task's head (task), every class
    seen so far (class: None), the shared head (domain: None)."""
    return task.index if stream.scenario == "task" else None


def log_probs_and_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and class, log p(c|x) and its weight p(c|x) in the Fisher's exact expectation over classes."""
    log_p = F.log_softmax(logits, dim=1)
    return log_p, log_p.detach().exp()


def predicted_log_prob(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, log p(c*|x) of the predicted class c* = argmax p(c|x), with weight 1."""
    log_p = F.log_softmax(logits, dim=1)
    best = log_p.gather(1, log_p.detach().argmax(1, keepdim=True))
    return best, torch.ones_like(best)


FISHER_OUTPUTS = {"expectation": log_probs_and_probs, "predicted": predicted_log_prob}


class FisherPenalty(Penalty):
    """EWC's penalty (see the module's docstring): lambda, online or not, gamma, the images and labels of the
    Fisher."""

    def __init__(self, ewc_lambda: float, online: bool, gamma: float, samples: int | None, labels: str):
        super().__init__(ewc_lambda / 2 * (gamma if online else 1.0))
        self.online, self.gamma, self.samples, self.labels = online, gamma, samples, labels

    def fisher(self, model, task: Task, names: list[str], stream: Stream, hw: Hardware) -> Tensors:
        """The diagonal Fisher of parameters `names` on `samples` of the task's training images."""
        images = sample_images(task, self.samples)
        outputs = FISHER_OUTPUTS[self.labels]
        head = _output_head(task, stream)
        return sample_mean(model, names, images, _test_inputs(stream, hw, task), head, outputs, torch.square)

    def end(self, model, task, trained, stream, hw) -> None:
        fisher = self.fisher(model, task, list(trained), stream, hw)
        if self.online:
            running = self.importance
            fisher = {n: f + self.gamma * running[n] if n in running else f for n, f in fisher.items()}
            fisher |= {n: self.gamma * f for n, f in running.items() if n not in fisher}
        params = dict(model.named_parameters())
        anchor = {n: params[n].detach().clone() for n in fisher}
        if self.online:
            self.importance, self.anchors = fisher, anchor
        else:
            self.add(fisher, anchor)


class PathIntegralPenalty(Penalty):
    """SI's penalty (see the module's docstring): `si_c`, `epsilon`, `task_gradient`."""

    def __init__(self, si_c: float, epsilon: float, task_gradient: bool):
        super().__init__(si_c)
        self.epsilon, self.task_gradient = epsilon, task_gradient
        self.trained: dict[str, torch.nn.Parameter] = {}
        self.start: Tensors = {}  # parameters at the task's start
        self.previous: Tensors = {}  # parameters before the current step
        self.path: Tensors = {}  # W

    def begin(self, trained: dict[str, torch.nn.Parameter]) -> None:
        self.trained = trained
        self.start = {n: p.detach().clone() for n, p in trained.items()}
        self.previous = {n: p.detach().clone() for n, p in trained.items()}
        self.path = {n: torch.zeros_like(p) for n, p in trained.items()}

    def after_step(self, step: Step) -> None:
        """Add this step's contribution -g * (theta - theta before) to the path integral W."""
        omega, anchor = self.importance, self.anchors
        for name, p in self.trained.items():
            if p.grad is None:
                continue
            grad = p.grad
            if self.task_gradient and name in omega:
                grad = grad - 2 * self.weight * omega[name] * (self.previous[name] - anchor[name])
            self.path[name] -= grad * (p.detach() - self.previous[name])
            self.previous[name].copy_(p.detach())

    def end(self, model, task, trained, stream, hw) -> None:
        omega, anchor = self.importance, self.anchors
        for name, p in trained.items():
            added = self.path[name] / ((p.detach() - self.start[name]).square() + self.epsilon)
            omega[name] = omega[name] + added if name in omega else added
            anchor[name] = p.detach().clone()
        self.trained, self.start, self.previous, self.path = {}, {}, {}, {}


def squared_norm(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the squared L2 norm of the output, with weight 1."""
    norm = logits.square().sum(1, keepdim=True)
    return norm, torch.ones_like(norm)


class MASPenalty(Penalty):
    """MAS's penalty (see the module's docstring): `mas_lambda`, `importance_samples`."""

    def __init__(self, mas_lambda: float, samples: int | None):
        super().__init__(mas_lambda)
        self.samples = samples

    def importance_of(self, model, task: Task, names: list[str], stream: Stream, hw: Hardware) -> Tensors:
        """Mean |gradient of the squared output norm| on `samples` of the task's training images."""
        images = sample_images(task, self.samples)
        head = _output_head(task, stream)
        return sample_mean(model, names, images, _test_inputs(stream, hw, task), head, squared_norm, torch.abs)

    def end(self, model, task, trained, stream, hw) -> None:
        omega, anchor = self.importance, self.anchors
        for name, added in self.importance_of(model, task, list(trained), stream, hw).items():
            omega[name] = omega[name] + added if name in omega else added
            anchor[name] = trained[name].detach().clone()


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
