"""Progressive neural networks: frozen columns, laterals wired where they belong, storage, resume, learning."""

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
)

from clrun.errors import ClrunError
from clrun.methods.pnn import PNN
from clrun.models.layers import Conv2d, Linear

TINY = [
    *TINY_STREAM,
    "method=pnn",
    "method.train.iterations=4",
    "method.train.batch_size=32",
]
MLP = ["backbone=mlp", "backbone.hidden=[16,12]"]
CONVNET = ["backbone=convnet", "backbone.width=0.125"]  # 4, 8, 16 channels


def make(*overrides):
    return build_method(PNN, *TINY, *overrides)[:2]


@pytest.mark.parametrize("backbone", [MLP, CONVNET, ["backbone=vgg16_bn", "backbone.width=0.125"]])
def test_earlier_columns_and_logits_stay_bit_identical(backbone):
    method, stream = make(*backbone)
    logits, states = [], []
    for task in stream.tasks:
        method.learn(task)
        for j in range(task.index):  # every earlier column, its head, laterals and batch-norm statistics
            assert torch.equal(method.predict(task_inputs(stream, j), j), logits[j])
            after = method.net.columns[j].state_dict()
            assert all(torch.equal(after[k], v) for k, v in states[j].items())
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        states.append(snapshot(method.net.columns[task.index]))
    assert logits[2].shape == (32, 2)


def test_laterals_feed_each_later_layer_and_learn():
    method, stream = make(*CONVNET)
    method.learn(stream.tasks[0])
    rng = torch.get_rng_state()
    method.learn(stream.tasks[1])
    torch.set_rng_state(rng)
    initial = method.new_column(stream.tasks[1])  # column 1 as `learn` drew it, before training
    column = method.net.columns[1]
    # stages: conv 3->4, conv 4->8, conv 8->16, head 16->2; laterals into all but the first, 1x1 convs for convs
    convs = [(lat.v, lat.u) for lat in column.laterals[:2]]
    assert [(v.in_channels, v.out_channels, u.out_channels) for v, u in convs] == [(4, 4, 8), (8, 8, 16)]
    assert all(isinstance(m, Conv2d) and m.kernel_size == (1, 1) for pair in convs for m in pair)
    head = column.laterals[2]
    assert isinstance(head.v, Linear) and (head.v.in_features, head.u.out_features) == (16, 2)
    assert not head.nonlinear and all(lat.nonlinear for lat in column.laterals[:2])
    for trained, drawn in zip(column.laterals, initial.laterals, strict=True):  # the laterals train
        assert not torch.equal(trained.alpha, drawn.alpha) and not torch.equal(trained.v.weight, drawn.v.weight)
    x = task_inputs(stream, 1)
    with_laterals = method.predict(x, 1).clone()
    with torch.no_grad():
        for lateral in column.laterals:
            lateral.alpha.zero_()
    assert not torch.allclose(method.predict(x, 1), with_laterals)  # column 1 reads column 0's activations


def test_footprint_counts_columns_heads_and_laterals():
    method, stream = make(*MLP)
    # synthetic 3x32x32 -> 3072 inputs; column: 3072->16->12, head 12->2
    column = 3072 * 16 + 16 + 16 * 12 + 12 + 12 * 2 + 2
    expected = [column]
    for earlier in (1, 2):
        hidden = earlier + (16 * earlier * 16 + 16) + (16 * 12 + 12)  # alphas, V (reduce to 16), U into layer 2
        head = earlier + (12 * earlier * 12 + 12) + (12 * 2 + 2)  # alphas, V (reduce to 12), U into the head
        expected.append(expected[-1] + column + hidden + head)
    for task, total in zip(stream.tasks, expected, strict=True):
        method.learn(task)
        footprint = method.footprint()
        assert (footprint.params, footprint.base_params) == (total, column)
        assert footprint.bytes == 4 * total  # fp32 parameters, no buffers in an MLP


def test_column_width_scales_columns_but_not_the_base():
    method, stream = make(*MLP, "method.column_width=0.5")
    method.learn(stream.tasks[0])
    assert method.net.columns[0].backbone.out_features == 6
    assert method.footprint().base_params == 3072 * 16 + 16 + 16 * 12 + 12 + 12 * 2 + 2


def test_backbones_with_skip_connections_fail_clearly():
    with pytest.raises(ClrunError, match="backbone.name=resnet18 has skip connections"):
        make("backbone=resnet18", "backbone.width=0.125")


@pytest.mark.parametrize("scenario", [["stream.scenario=task"], ["stream.scenario=class", "method.task_id=entropy"]])
def test_resume_after_task_2_equals_uninterrupted(tmp_path, scenario):
    overrides = [*TINY, *MLP, *scenario]
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    R = matrix(straight)
    if scenario == ["stream.scenario=task"]:  # with the task id no forgetting (class: task inference may err)
        assert all((R[j:, j] == R[j, j]).all() for j in range(3))


@needs_shared("MNIST", "raw")
def test_learns_real_split_mnist_without_forgetting(tmp_path):
    summary, run_dir = run(
        tmp_path,
        *TINY,
        *MLP,
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=256",
        "stream.test_per_task=200",
        "method.train.iterations=30",
    )
    R = matrix(run_dir)
    assert np.diag(R).min() > 0.8  # chance: 0.5
    assert summary["bwt"] == 0.0
