"""XdG: gate proportions, gates applied at training and test, seeded masks kept on resume, EWC/SI under the gates."""

import numpy as np
import pytest
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    build_method,
    matrix,
    needs_shared,
    run,
    run_interrupted_then_resumed,
    task_inputs,
)

from clrun.errors import ClrunError
from clrun.methods.parts.importance import FisherPenalty, PathIntegralPenalty
from clrun.results import count_params, module_bytes

TINY = [
    *TINY_STREAM,
    "method=xdg",
    "backbone=mlp",
    "backbone.width=0.25",
    "method.train.epochs=1",
]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


@pytest.mark.parametrize(
    "overrides, units",
    [
        ([], [100, 100]),
        (["backbone=convnet", "method.gating=0.5"], [8, 16, 32]),
        (["backbone=vgg16_bn", "backbone.width=0.125", "method.gate_conv=false"], [512, 512]),  # the 2 fc layers
    ],
    ids=["mlp", "convnet", "vgg16_bn-fc-only"],
)
def test_each_task_silences_the_configured_share_of_every_hidden_layer(overrides, units):
    method, stream, cfg = make(*overrides)
    assert [layer.units for layer in method.layers] == units
    for task in range(len(stream)):
        for mask, n in zip(method.masks[task], units, strict=True):
            assert mask.dtype == torch.bool and int(mask.sum()) == n - round(cfg.method.gating * n)
    assert not torch.equal(method.masks[0][-1], method.masks[1][-1])  # a gate of its own per task

    outputs = []  # what the next layers see: each activation's output after the gate
    hooks = [layer.activation.register_forward_hook(lambda m, i, out: outputs.append(out)) for layer in method.layers]
    method.learn(stream.tasks[0])
    outputs.clear()
    method.predict(task_inputs(stream, 0), 0)
    for out, mask in zip(outputs, method.masks[0], strict=True):
        per_unit = out.abs().flatten(2).sum(2) if out.dim() == 4 else out.abs()
        assert (per_unit[:, ~mask] == 0).all() and (per_unit[:, mask] > 0).any()
    for hook in hooks:
        hook.remove()


def test_silenced_units_do_not_train_and_do_not_count_in_ewc_or_si():
    """The gate also acts while training and while EWC's Fisher and SI's path integral are measured: the
    incoming weights of units task 0 silences get no gradient, hence no movement, Fisher or importance."""
    for regularizer, penalty in (("none", type(None)), ("ewc", FisherPenalty), ("si", PathIntegralPenalty)):
        method, stream, _ = make(f"method.regularizer={regularizer}")
        assert type(method.penalty) is penalty
        first = method.layers[0].layer
        before = first.weight.detach().clone()
        method.learn(stream.tasks[0])
        silenced = ~method.masks[0][0]
        assert torch.equal(first.weight[silenced], before[silenced])
        assert not torch.equal(first.weight[~silenced], before[~silenced])
        if regularizer != "none":
            name = next(n for n, p in method.model.named_parameters() if p is first.weight)
            importance = method.penalty.importance[name]
            assert (importance[silenced] == 0).all() and (importance[~silenced] != 0).any()


def test_masks_come_from_the_seed_and_survive_a_reload():
    method, stream, _ = make()
    same, _, _ = make()
    other, _, _ = make("method.mask_seed=7")
    assert all(torch.equal(a, b) for a, b in zip(method.masks[2], same.masks[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(method.masks[2], other.masks[2], strict=True))
    for task in stream.tasks[:2]:
        method.learn(task)
    other.load_state_dict(method.state_dict())
    assert all(torch.equal(a, b) for t in range(3) for a, b in zip(method.masks[t], other.masks[t], strict=True))
    for j in range(2):  # the reloaded model is gated again, each task by its own mask
        assert torch.equal(other.predict(task_inputs(stream, j), j), method.predict(task_inputs(stream, j), j))
    assert other.footprint() == method.footprint()


def test_each_task_predicts_with_the_batch_norm_statistics_of_its_own_gate():
    method, stream, _ = make("backbone=convnet")
    for task in stream.tasks[:2]:
        method.learn(task)
    first, second = method.statistics
    assert first.keys() == second.keys() and len(first) == 9  # 3 batch norms: mean, var, count
    assert not torch.equal(first["backbone.layers.1.running_mean"], second["backbone.layers.1.running_mean"])
    before = [method.predict(task_inputs(stream, j), j) for j in range(2)]
    for name, buffer in method.model.named_buffers():
        if name.endswith("running_mean"):
            buffer.fill_(5.0)  # the live statistics play no part in prediction
    assert all(torch.equal(method.predict(task_inputs(stream, j), j), before[j]) for j in range(2))
    statistics = 2 * (2 * (8 + 16 + 32) * 4 + 3 * 8)  # per task: fp32 mean and var, int64 counts
    # the shared model, the statistics and the gates' bits
    assert method.footprint().bytes == module_bytes(method.model) + statistics + 2 * (1 + 2 + 4)


def test_footprint_adds_the_learned_tasks_gates_as_bits():
    method, stream, _ = make("method.regularizer=si")
    for task in stream.tasks[:2]:
        method.learn(task)
    shared = module_bytes(method.model) + method.penalty.bytes()  # the model and SI's importance and anchors
    assert method.footprint().params == count_params(method.model)
    assert method.footprint().bytes == shared + 2 * 2 * 13  # 2 tasks x 2 layers x ceil(100 / 8)


def test_resume_equals_uninterrupted_and_class_scenario_runs(tmp_path):
    overrides = [*TINY, "method.regularizer=ewc", "method.ewc_lambda=100"]
    _, straight = run(tmp_path, *overrides)
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(straight), matrix(resumed))
    summary, _ = run(tmp_path, *TINY, "stream.scenario=class", "method.task_id=confidence", name="class")
    assert 0 <= summary["acc"] <= 1


def test_gate_conv_false_needs_a_hidden_linear_layer():
    with pytest.raises(ClrunError, match="no hidden linear layer"):
        make("backbone=convnet", "method.gate_conv=false")


@needs_shared("MNIST")
def test_learns_split_mnist():
    method, stream, _ = build_method(
        None,
        *TINY,
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=512",
        "stream.test_per_task=200",
        "method.train.epochs=2",
    )
    for task in stream.tasks:
        method.learn(task)
    for j, task in enumerate(stream.tasks):
        assert (method.predict(task_inputs(stream, j), j).argmax(1) == task.test.y).float().mean() > 0.85
