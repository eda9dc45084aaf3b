"""EWC, online EWC, SI and MAS: importance estimates against hand computations, penalties, resume, real MNIST."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, matrix, needs_shared, run, run_interrupted_then_resumed
from test_train import make_method
from torch import nn

from clrun.methods.ewc import EWC
from clrun.methods.mas import MAS
from clrun.methods.parts.importance import (
    FisherPenalty,
    MASPenalty,
    log_probs_and_probs,
    predicted_log_prob,
    sample_mean,
    squared_norm,
)
from clrun.methods.si import SI
from clrun.models.layers import Linear
from clrun.results import module_bytes

ITERS = ["hardware.threads=1", "method.train.iterations=3"]


class Tiny(nn.Module):
    """Linear 3 -> 4, in-place ReLU, linear 4 -> 3, with `forward(x, head)` like a TaskModel (head ignored)."""

    def __init__(self, linear: type[nn.Linear]):
        super().__init__()
        self.hidden = linear(3, 4)
        self.out = linear(4, 3)

    def forward(self, x: torch.Tensor, head) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x), inplace=True))


def tiny_pair() -> tuple[Tiny, Tiny, torch.Tensor]:
    """The same tiny network twice: with clrun Linear layers (outer-product path) and torch.nn.Linear (torch.func
    path); and 5 inputs."""
    torch.manual_seed(0)
    fast = Tiny(Linear)
    generic = Tiny(nn.Linear)
    generic.load_state_dict(fast.state_dict())
    return fast, generic, torch.randn(5, 3)


def fisher_by_loops(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean_x sum_c p(c|x) (d log p(c|x) / d theta)^2, one autograd call per sample and class."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for sample in x:
        log_p = F.log_softmax(model(sample[None], None), dim=1)[0]
        for c in range(len(log_p)):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                total[name] += log_p[c].exp().item() * g**2
    return {name: t / len(x) for name, t in total.items()}


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)


def test_predicted_fisher_is_the_squared_gradient_at_the_predicted_class():
    fast, generic, x = tiny_pair()
    params = dict(fast.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for sample in x:
        log_p = F.log_softmax(fast(sample[None], None), dim=1)[0]
        grads = torch.autograd.grad(log_p[log_p.argmax()], list(params.values()))
        for name, g in zip(params, grads, strict=True):
            expected[name] += g**2 / len(x)
    for model in (fast, generic):
        assert_close(sample_mean(model, list(params), x, lambda v: v, None, predicted_log_prob, torch.square), expected)


def test_fisher_is_the_exact_expectation_over_predicted_classes():
    fast, generic, x = tiny_pair()
    names = [name for name, _ in fast.named_parameters()]
    expected = fisher_by_loops(fast, x)
    for model in (fast, generic):
        assert_close(sample_mean(model, names, x, lambda v: v, None, log_probs_and_probs, torch.square), expected)

    # the output layer by hand: d log p_c / d W = (e_c - p) h^T, d log p_c / d b = e_c - p
    with torch.no_grad():
        h = F.relu(fast.hidden(x))
        p = F.softmax(fast.out(h), dim=1)
        eye = torch.eye(3)
        by_hand_w = sum((p[n, c] * torch.outer(eye[c] - p[n], h[n]) ** 2 for n in range(5) for c in range(3))) / 5
        by_hand_b = sum((p[n, c] * (eye[c] - p[n]) ** 2 for n in range(5) for c in range(3))) / 5
    head_only = sample_mean(fast, ["out.weight", "out.bias"], x, lambda v: v, None, log_probs_and_probs, torch.square)
    torch.testing.assert_close(head_only["out.weight"], by_hand_w)
    torch.testing.assert_close(head_only["out.bias"], by_hand_b)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm():
    torch.manual_seed(0)
    fast, x = Linear(3, 2), torch.randn(4, 3)
    generic = nn.Linear(3, 2)
    generic.load_state_dict(fast.state_dict())

    class Headless(nn.Module):  # forward(x, head) around one linear layer
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x, head):
            return self.layer(x)

    with torch.no_grad():  # d ||W x + b||^2 / dW = 2 f x^T, / db = 2 f
        f = fast(x)
        by_hand = {
            "layer.weight": sum(torch.outer(2 * f[n], x[n]).abs() for n in range(4)) / 4,
            "layer.bias": sum((2 * f[n]).abs() for n in range(4)) / 4,
        }
    for layer in (fast, generic):
        model = Headless(layer)
        assert_close(sample_mean(model, list(by_hand), x, lambda v: v, None, squared_norm, torch.abs), by_hand)


def names_of(method, *prefixes: str) -> set[str]:
    return {name for name, _ in method.model.named_parameters() if name.startswith(prefixes)}


def test_ewc_folds_the_tasks_fishers_into_one_term():
    method, stream = make_method(EWC, "method=ewc", "method.ewc_lambda=4", *ITERS)
    for task in stream.tasks:
        method.learn(task)
    # task scenario: each task's own head and the backbone (another head's Fisher is zero: no term)
    assert method.penalty.importance.keys() == method.penalty.anchors.keys() == names_of(method, "backbone", "heads")
    params = dict(method.model.named_parameters())
    # head 1 has only task 2's term: its anchor is the weights there (0 where the Fisher is 0, as I a / I gives)
    seen = method.penalty.importance["heads.heads.1.weight"] > 0
    anchor = method.penalty.anchors["heads.heads.1.weight"]
    torch.testing.assert_close(anchor[seen], params["heads.heads.1.weight"][seen])
    assert seen.any() and (anchor[~seen] == 0).all()
    assert not torch.equal(method.penalty.anchors["backbone.layers.1.weight"], params["backbone.layers.1.weight"])
    stored = sum(t.numel() * 4 for term in (method.penalty.importance, method.penalty.anchors) for t in term.values())
    assert method.footprint().bytes == module_bytes(method.model) + stored


class Parameters(nn.Module):
    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t.clone()))


def test_the_folded_penalty_equals_the_sum_of_per_task_penalties_in_value_and_gradient():
    """Five tasks' terms on a shared `w` (some importances zero) and each task's own head `h<k>`, folded by `add`:
    the penalty and its gradient equal the per-task form sum_k weight I_k (theta - a_k)^2 (float64 by hand)."""
    generator = torch.Generator().manual_seed(0)
    terms = []
    for k in range(5):
        importance = {"w": torch.rand(4, 3, generator=generator) * (torch.rand(4, 3, generator=generator) > 0.3)}
        importance[f"h{k}"] = torch.rand(2, generator=generator)
        terms.append((importance, {n: torch.randn(t.shape, generator=generator) for n, t in importance.items()}))
    model = Parameters(w=torch.randn(4, 3, generator=generator), **{f"h{k}": torch.randn(2) for k in range(5)})
    penalty = FisherPenalty(ewc_lambda=3.0, online=False, gamma=1.0, samples=None, labels="predicted")
    for importance, anchor in terms:
        penalty.add(importance, anchor)
    assert penalty.importance.keys() == {"w", *(f"h{k}" for k in range(5))}  # one term, however many tasks

    theta = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    by_hand = sum(
        1.5 * (i.double() * (theta[n] - a[n].double()).square()).sum() for t, a in terms for n, i in t.items()
    )
    by_hand.backward()
    folded = penalty.value(penalty.terms(model))
    folded.backward()
    assert folded.item() == pytest.approx(by_hand.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), theta[name].grad, rtol=1e-5, atol=1e-6)

    # training `w` and head 4 only: the other heads' terms are one constant, the same value, no gradient for them
    model.zero_grad()
    moving, constant = penalty.terms(model, {"w", "h4"})
    assert [p for p, _, _ in moving] == [model.w, model.h4]
    penalty.value((moving, constant)).backward()
    assert penalty.value((moving, constant)).item() == pytest.approx(by_hand.item(), rel=1e-6)
    torch.testing.assert_close(model.w.grad.double(), theta["w"].grad, rtol=1e-5, atol=1e-6)
    assert model.h0.grad is None


def test_a_checkpoint_of_per_task_terms_loads_folded():
    """Checkpoints from before the fold hold one (importance, anchor) term per task: loading folds them."""
    terms = [
        ({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 5.0])}),
        ({"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([6.0, 1.0])}),
    ]
    penalty = FisherPenalty(ewc_lambda=1.0, online=False, gamma=1.0, samples=None, labels="predicted")
    penalty.load_state_dict(
        {"importance": [t[0] for t in terms], "anchors": [t[1] for t in terms]}, torch.device("cpu")
    )
    torch.testing.assert_close(penalty.importance["w"], torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(penalty.anchors["w"], torch.tensor([5.0, 1.0]))  # (1*2 + 3*6) / 4; (0*5 + 1*1) / 1
    assert penalty.spread == pytest.approx(1 * 3 / 4 * (6 - 2) ** 2)  # m = I_1 I_2 / (I_1 + I_2) (a_2 - a_1)^2


def test_class_scenario_fisher_covers_every_head_seen():
    method, stream = make_method(EWC, "method=ewc", "stream.scenario=class", *ITERS)
    method.learn(stream.tasks[0])
    head0 = method.penalty.importance["heads.heads.0.weight"].clone()
    method.learn(stream.tasks[1])
    assert method.penalty.importance.keys() == names_of(method, "backbone", "heads")
    # task 2's Fisher on head 0 is not zero: head 0 is part of its output
    assert method.penalty.importance["heads.heads.0.weight"].sum() > head0.sum()


def constant_importance(monkeypatch, penalty_class, attribute: str) -> None:
    """Make task t's importance estimate t + 1 everywhere."""

    def constant(self, model, task, names, stream, hw):
        return {name: torch.full_like(dict(model.named_parameters())[name], task.index + 1.0) for name in names}

    monkeypatch.setattr(penalty_class, attribute, constant)


def test_online_ewc_keeps_one_running_fisher(monkeypatch):
    constant_importance(monkeypatch, FisherPenalty, "fisher")
    method, stream = make_method(EWC, "method=online_ewc", "method.ewc_lambda=3", "method.gamma=0.5", *ITERS)
    for task in stream.tasks:
        method.learn(task)
    fisher = method.penalty.importance
    assert fisher["backbone.layers.1.weight"].unique().tolist() == [0.5 * 1 + 2]  # gamma F_1 + F_2
    assert fisher["heads.heads.0.bias"].unique().tolist() == [0.5 * 1]  # head 0: decayed, nothing added
    assert fisher["heads.heads.1.bias"].unique().tolist() == [2]
    params = dict(method.model.named_parameters())
    assert all(torch.equal(anchor, params[name]) for name, anchor in method.penalty.anchors.items())
    assert method.penalty.weight == 3 / 2 * 0.5  # Schwarz et al.: the penalty weighs gamma F too


def test_mas_adds_importance_over_tasks(monkeypatch):
    constant_importance(monkeypatch, MASPenalty, "importance_of")
    method, stream = make_method(MAS, "method=mas", *ITERS)
    for task in stream.tasks:
        method.learn(task)
    omega = method.penalty.importance
    assert omega["backbone.layers.1.weight"].unique().tolist() == [3]
    assert omega["heads.heads.0.bias"].unique().tolist() == [1]
    assert omega["heads.heads.1.bias"].unique().tolist() == [2]
    params = dict(method.model.named_parameters())
    assert all(torch.equal(anchor, params[name]) for name, anchor in method.penalty.anchors.items())


def sgd_task(method: SI, theta: nn.Parameter, target: torch.Tensor, steps: int, lr: float) -> tuple:
    """Plain SGD on 0.5 ||theta - target||^2 plus SI's penalty, through SI's hooks; returns the path integral of
    the total loss's gradient and of the task loss's gradient, summed here step by step."""
    c = method.cfg.si_c
    omega, anchor = (
        (method.penalty.importance["theta"], method.penalty.anchors["theta"]) if method.penalty.importance else (0, 0)
    )
    method.penalty.begin({"theta": theta})
    w_total = w_task = torch.zeros(3)
    for _ in range(steps):
        task_grad = theta.detach() - target
        theta.grad = task_grad + 2 * c * omega * (theta.detach() - anchor)
        before = theta.detach().clone()
        with torch.no_grad():
            theta -= lr * theta.grad
        w_total = w_total - theta.grad * (theta.detach() - before)
        w_task = w_task - task_grad * (theta.detach() - before)
        method.penalty.after_step(None)
    method.penalty.end(None, None, {"theta": theta}, None, None)
    return w_total, w_task


@pytest.mark.parametrize("task_gradient", [False, True])
def test_si_path_integral_on_a_quadratic(task_gradient):
    overrides = ["method=si", "method.si_c=0.7", "method.epsilon=0.1", f"method.task_gradient={task_gradient}"]
    method, _ = make_method(SI, *overrides, *ITERS)
    theta0, a, lr, k = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]), 0.1, 20
    theta = nn.Parameter(theta0.clone())
    sgd_task(method, theta, a, k, lr)
    # theta_k - a = r^k d0 (r = 1 - lr), so W = sum_k lr (r^k d0)^2 and delta = (r^K - 1) d0
    r, d0 = 1 - lr, theta0 - a
    w = lr * d0**2 * (1 - r ** (2 * k)) / (1 - r**2)
    omega = w / (((r**k - 1) * d0) ** 2 + 0.1)
    torch.testing.assert_close(method.penalty.importance["theta"], omega)
    assert omega[2] == 0  # a parameter that never moved has no importance
    assert torch.equal(method.penalty.anchors["theta"], theta.detach())

    # a second task: the penalty's gradient enters W unless task_gradient; omega adds up
    start = theta.detach().clone()
    w_total, w_task = sgd_task(method, theta, torch.tensor([2.0, 0.0, -1.0]), k, lr)
    added = (w_task if task_gradient else w_total) / ((theta.detach() - start) ** 2 + 0.1)
    torch.testing.assert_close(method.penalty.importance["theta"], omega + added)
    assert not torch.allclose(w_total, w_task)


TINY_RUN = [
    "hardware=cpu",
    "hardware.threads=1",
    "backbone.width=0.5",  # a convnet: batch norm and the torch.func path
    "stream.n_tasks=3",
    "stream.train_per_task=160",
    "stream.test_per_task=80",
    "method.train.epochs=1",
    "method.train.batch_size=32",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=ewc", "method.replay.budget=40"],
        ["method=online_ewc", "stream.scenario=class"],
        ["method=si", "stream.scenario=domain"],
        ["method=mas", "stream.scenario=class"],
    ],
    ids=["ewc-replay-task", "online_ewc-class", "si-domain", "mas-class"],
)
def test_resume_after_task_2_equals_the_uninterrupted_run(tmp_path, overrides):
    _, uninterrupted = run(tmp_path, *TINY_RUN, *overrides, name="full")
    resumed = run_interrupted_then_resumed(tmp_path, *TINY_RUN, *overrides)
    np.testing.assert_array_equal(matrix(resumed), matrix(uninterrupted))


@needs_shared("MNIST", "raw")
def test_real_split_mnist_regularisers_forget_less_than_finetune(tmp_path):
    common = [
        "hardware=cpu",
        "hardware.threads=1",
        "stream=split_mnist",
        "backbone=mlp",
        "backbone.hidden=[100,100]",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=1000",
        "stream.test_per_task=300",
        "method.train.iterations=100",
        "method.train.lr=0.005",  # forgets clearly within 100 steps (finetune BWT -0.05 to -0.08 over seeds 0-2)
    ]
    finetune, _ = run(tmp_path, *common, "method=finetune", name="finetune")
    assert finetune["bwt"] < -0.04
    for method in ("ewc", "online_ewc", "si", "mas"):
        summary, _ = run(tmp_path, *common, f"method={method}", name=method)
        assert summary["acc"] > 0.9, method  # chance is 0.5
        assert summary["bwt"] > finetune["bwt"] + 0.025, method
