"""DAN: a frozen base, controllers over its filters, every task's logits kept, the added parameters, resume."""

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
    snapshot,
    task_inputs,
    unchanged,
)

from clrun.methods.dan import DAN, controlled_copy, quantize_
from clrun.models.layers import Conv2d, Linear

TINY = [*TINY_STREAM, "method=dan", "method.train.iterations=4", "method.train.batch_size=32"]
MLP = ["backbone=mlp", "backbone.hidden=[16,12]"]
CONVNET = ["backbone=convnet", "backbone.width=0.125"]  # 4, 8, 16 channels, bias-free convs with batch norm


def make(*overrides):
    return build_method(DAN, *TINY, *overrides)[:2]


@pytest.mark.parametrize("backbone", [MLP, CONVNET])
def test_base_frozen_after_task_0_and_every_tasks_logits_stay_bit_identical(backbone):
    method, stream = make(*backbone)
    net, logits, controlled = method.net, [], []
    for task in stream.tasks:
        method.learn(task)
        if task.index == 0:
            base = snapshot(net.base)  # weights and batch-norm statistics, frozen from now on
        assert unchanged(net.base, base)
        for j in range(task.index):
            assert torch.equal(method.predict(task_inputs(stream, j), j), logits[j])
            assert j == 0 or unchanged(net.controlled[j - 1], controlled[j - 1])
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        if task.index:
            controlled.append(snapshot(net.controlled[task.index - 1]))
    layers = [m for m in net.controlled[0].modules() if isinstance(m, (Conv2d, Linear))]
    assert all(not torch.equal(m.control, torch.eye(len(m.control))) for m in layers)  # the controllers learned


@pytest.mark.parametrize("backbone", [MLP, CONVNET])
def test_identity_controllers_reproduce_the_base_exactly(backbone):
    method, stream = make(*backbone)
    method.learn(stream.tasks[0])
    base, x = method.net.base.eval(), task_inputs(stream, 0)
    copy = controlled_copy(base).eval()
    with torch.no_grad():
        assert torch.equal(copy(x), base(x))
        for frozen, layer in zip(base.modules(), copy.modules(), strict=True):
            if isinstance(layer, (Conv2d, Linear)):
                assert "weight" not in layer._parameters  # only the controller: the filters are the base's
                assert torch.equal(layer.effective_weight(), frozen.weight)


def test_a_controller_recombines_the_base_filters():
    method, stream = make(*MLP)
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    frozen, layer = method.net.base.layers[1], method.net.controlled[0].layers[1]
    expected = torch.stack([sum(layer.control[i, j] * frozen.weight[j] for j in range(16)) for i in range(16)])
    torch.testing.assert_close(layer.effective_weight(), expected)


@pytest.mark.parametrize(
    ("backbone", "added"),
    [
        (MLP, (16 * 16 + 16) + (12 * 12 + 12) + (12 * 2 + 2)),  # controllers and biases per layer, head
        (CONVNET, 4 * 4 + 8 * 8 + 16 * 16 + 2 * (4 + 8 + 16) + (16 * 2 + 2)),  # controllers, batch norm, head
    ],
)
def test_added_parameters_per_task_match_the_hand_count(backbone, added):
    method, stream = make(*backbone)
    rows = [method.learn(task) for task in stream.tasks]
    base = method.footprint().base_params
    assert [row["added_params"] for row in rows] == [0, added, added]
    assert method.footprint().params == base + 2 * added


def test_quantize_rounds_to_evenly_spaced_levels_between_the_ends():
    control = torch.tensor([[0.0, 0.1], [0.26, 1.0]])
    quantize_(control, bits=2)  # levels 0, 1/3, 2/3, 1
    torch.testing.assert_close(control, torch.tensor([[0.0, 0.0], [1 / 3, 1.0]]))


def test_quantized_controllers_take_2_to_the_bits_values_and_store_that_many_bits():
    method, stream = make(*MLP, "method.quantize_bits=2")
    logits = []
    for task in stream.tasks:
        method.learn(task)
        for j in range(task.index):
            assert torch.equal(method.predict(task_inputs(stream, j), j), logits[j])
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
    for body in method.net.controlled:
        controls = [m.control for m in body.modules() if isinstance(m, Linear)]
        for c in controls:
            levels = (c - c.min()) / ((c.max() - c.min()) / 3)  # 0, 1, 2, 3 for 2 bits
            assert 1 < len(c.unique()) <= 4 and torch.allclose(levels, levels.round(), atol=1e-4)
    footprint = method.footprint()  # 2 tasks x (16 x 16 and 12 x 12 controllers): 2 bits each and 2 floats
    assert footprint.bytes == 4 * footprint.params - 2 * 4 * (256 + 144) + 2 * ((64 + 8) + (36 + 8))


def test_resume_after_task_2_equals_uninterrupted(tmp_path):
    overrides = [*TINY, *CONVNET]
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    states = [
        torch.load(d / "checkpoints" / "last.pt", weights_only=True)["method"]["net"] for d in (straight, resumed)
    ]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(k.endswith("control") for k in states[0])


@needs_shared("MNIST", "raw")
def test_learns_real_split_mnist_without_forgetting(tmp_path):
    summary, run_dir = run(
        tmp_path,
        *TINY,
        "backbone=mlp",
        "backbone.hidden=[64,64]",  # 16 units: too few base filters to recombine for new digits
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=256",
        "stream.test_per_task=200",
        "method.train.iterations=100",
    )
    assert np.diag(matrix(run_dir)).min() > 0.8  # chance: 0.5
    assert summary["bwt"] == 0.0
