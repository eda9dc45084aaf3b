"""The output regulariser of task-conditioned hypernetworks (von Oswald et al. 2020), shared by `hn` and
`partial_hn`: after the task loss's backward pass, add the gradient of

    beta / |J| * sum_{j in J} || h(e_j, Theta + dTheta) - h(e_j, Theta*) ||^2

to Theta's (and to the earlier embeddings' where they are trainable), where h(e_j, Theta*) was computed before
the task and dTheta is a lookahead step on the task loss alone."""

from enum import Enum

import torch
from torch import nn
from torch.func import functional_call


class Lookahead(Enum):
    optimizer = "optimizer"  # the step the optimizer is about to take (hypercl's calc_delta_theta)
    sgd = "sgd"  # -lr * grad of the task loss, whatever the optimizer (Hemati et al.'s first-order inner step)
    none = "none"  # regularise at Theta itself


def candidate_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """The change `optimizer.step()` would make to `param` from its current gradient, without making it
    (detached; hypercl's utils/optim_step.calc_delta_theta): SGD, Adam and AdamW as clrun configures them."""
    if param.grad is None:
        return torch.zeros_like(param)
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state.get(param, {})
    lr, decay = group["lr"], group["weight_decay"]
    grad, value = param.grad.detach(), param.detach()
    if isinstance(optimizer, torch.optim.SGD):
        grad = grad + decay * value
        if group["momentum"]:
            buffer = state.get("momentum_buffer")
            buffer = grad if buffer is None else group["momentum"] * buffer + (1 - group["dampening"]) * grad
            grad = grad + group["momentum"] * buffer if group["nesterov"] else buffer
        return -lr * grad
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    if not decoupled:
        grad = grad + decay * value
    beta1, beta2 = group["betas"]
    step = float(state["step"]) + 1 if state else 1.0
    m = (1 - beta1) * grad + (beta1 * state["exp_avg"] if state else 0)
    v = (1 - beta2) * grad**2 + (beta2 * state["exp_avg_sq"] if state else 0)
    update = lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])
    return -update - lr * decay * value if decoupled else -update


def sgd_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """-lr * the parameter's current gradient (detached), lr of its optimizer group."""
    if param.grad is None:
        return torch.zeros_like(param)
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return -group["lr"] * param.grad.detach()


def output_regulariser(
    hypernet: nn.Module,
    embeddings: list[torch.Tensor],
    targets: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    beta: float,
    lookahead: Lookahead,
) -> torch.Tensor:
    """beta / len(targets) * sum_j ||h(e_j, Theta + dTheta) - target_j||^2 (a graph to Theta and the embeddings;
    the lookahead step itself is detached, first order)."""
    params = dict(hypernet.named_parameters())
    step = {Lookahead.optimizer: candidate_step, Lookahead.sgd: sgd_step}.get(lookahead)
    if step is not None:
        params = {name: p + step(optimizer, p) for name, p in params.items()}
    reg = sum(
        ((functional_call(hypernet, params, (e,)) - target) ** 2).sum()
        for e, target in zip(embeddings, targets, strict=True)
    )
    return beta / len(targets) * reg


def embeddings_state(model: nn.Module, buffers: list[dict]) -> dict:
    """The state of a task-conditioned hypernetwork method: its model (task embeddings included), how many tasks
    it has embeddings for, and each task's buffers (e.g. batch-norm statistics)."""
    return {"model": model.state_dict(), "n_tasks": len(model.embeddings), "buffers": buffers}


def load_embeddings_state(model: nn.Module, state: dict, dim: int, device, trainable: bool) -> list[dict]:
    """Re-create `state`'s task embeddings on a freshly built `model` (`trainable`: whether they keep learning),
    load the model; return the tasks' buffers on `device`."""
    for _ in range(state["n_tasks"]):
        model.embeddings.append(nn.Parameter(torch.zeros(dim, device=device), requires_grad=trainable))
    model.load_state_dict(state["model"])
    return [{name: b.to(device) for name, b in task.items()} for task in state["buffers"]]
