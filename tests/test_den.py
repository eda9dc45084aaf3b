"""DEN on mlp, convnet and vgg16_bn: timestamps, expansion by k units (channels) with group-sparse pruning, split
keeps old copies, per-task batch norm, learning."""

import dataclasses

import pytest
import torch
from conftest import SHARED_DATA, build_method, matrix, needs_shared, run, task_inputs

from clrun.data.stream import Split
from clrun.errors import ClrunError
from clrun.methods.den import DEN

TINY = [
    "method=den",
    "hardware=cpu",
    "hardware.threads=1",
    "backbone=mlp",
    "backbone.width=0.25",
    "stream.n_tasks=2",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
    "method.train.iterations=15",
]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


def test_expansion_adds_k_units_and_task_0_uses_only_its_units():
    method, stream, _ = make("method.k=3", "method.tau=0", "method.sigma=1e9", "method.group_lasso=0")
    for task in stream.tasks:
        method.learn(task)
    assert method.widths == [[100, 100], [103, 103]]
    assert method.events[1] == {"added": 6, "pruned": 0, "split": 0}
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    for layer, (w, b) in enumerate(zip(method.weights, method.biases, strict=True)):  # later units: garbage
        w[100:] = 1e3
        b[100:] = 1e3
        if layer:
            w[:, 100:] = 1e3
    assert torch.equal(method.predict(x, 0), before)
    assert not torch.equal(method.predict(task_inputs(stream, 1), 1), before)
    assert method.heads[0][0].shape == (2, 100) and method.heads[1][0].shape == (2, 103)
    d = method.weights[0].shape[1]  # input features
    params = d * 103 + 103 + 103 * 103 + 103 + 2 * 100 + 2 + 2 * 103 + 2  # network + two heads, by hand
    assert method.footprint().params == params
    assert method.footprint().base_params == d * 100 + 100 + 100 * 100 + 100 + 2 * 100 + 2


def test_group_lasso_zeroes_and_deletes_the_new_units():
    method, stream, _ = make("method.k=3", "method.tau=0", "method.sigma=1e9", "method.group_lasso=100")
    for task in stream.tasks:
        method.learn(task)
    assert method.events[1] == {"added": 6, "pruned": 6, "split": 0}  # lr * group_lasso = 0.1 per step beats their norm
    assert method.widths == [[100, 100], [100, 100]]


def test_split_restores_old_units_for_old_tasks():
    """With sigma 0 and k covering the layer, every drifted unit is split: task 0's units get their old weights
    back, so its logits are bit-identical; the copies carry the new weights."""
    method, stream, _ = make("method.k=1000", "method.tau=1e9", "method.sigma=0")
    method.learn(stream.tasks[0])
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    old = [w.clone() for w in method.weights]
    method.learn(stream.tasks[1])
    split = method.events[1]["split"]
    assert split > 0 and sum(method.widths[1]) == 200 + split
    assert torch.equal(method.predict(x, 0), before)
    assert torch.equal(method.weights[0][:100], old[0])
    assert not torch.equal(method.weights[0][100:], old[0][: len(method.weights[0]) - 100])


CONV = ["backbone=convnet", "method.train.iterations=8"]  # width 0.25: 8, 16, 32 channels


def garble_later_units(method, task: int) -> None:
    """Set every weight, bias and batch-norm entry of units created after task `task` to 1e3."""
    widths = method.widths[task]
    for index, (w, b) in enumerate(zip(method.weights, method.biases, strict=True)):
        w[widths[index] :] = 1e3
        if index:
            w[:, widths[index - 1] * method.layers[index].repeat :] = 1e3
        if b is not None:
            b[widths[index] :] = 1e3
    for norms in method.norms[task + 1 :]:
        for norm in norms:
            for t in norm or []:
                t[...] = 1e3


def test_conv_expansion_adds_k_channels_and_task_0_uses_only_its_channels():
    method, stream, _ = make(*CONV, "method.k=3", "method.tau=0", "method.sigma=1e9", "method.group_lasso=0")
    for task in stream.tasks:
        method.learn(task)
    assert method.widths == [[8, 16, 32], [11, 19, 35]]
    assert method.events[1] == {"added": 9, "pruned": 0, "split": 0}
    assert [w.shape for w in method.weights] == [(11, 3, 3, 3), (19, 11, 3, 3), (35, 19, 3, 3)]
    assert [len(n[0]) for n in method.norms[0]] == [8, 16, 32] and [len(n[0]) for n in method.norms[1]] == [11, 19, 35]
    for old, new in zip(method.norms[0], method.norms[1], strict=True):  # task 1 trained its own copy
        assert not torch.equal(new[0][: len(old[0])], old[0])
    x = task_inputs(stream, 0)
    before, later = method.predict(x, 0), method.predict(x, 1)
    garble_later_units(method, 0)
    assert torch.equal(method.predict(x, 0), before)
    assert not torch.equal(method.predict(x, 1), later)
    convs = 11 * 3 * 9 + 19 * 11 * 9 + 35 * 19 * 9  # bias-free convolutions, by hand
    norms = 2 * (8 + 16 + 32) + 2 * (11 + 19 + 35)  # each task's batch-norm weight and bias
    assert method.footprint().params == convs + norms + (2 * 32 + 2) + (2 * 35 + 2)
    base = 8 * 3 * 9 + 16 * 8 * 9 + 32 * 16 * 9 + 2 * (8 + 16 + 32) + 2 * 32 + 2
    assert method.footprint().base_params == base


def test_conv_group_lasso_deletes_the_new_channels():
    method, stream, _ = make(*CONV, "method.k=3", "method.tau=0", "method.sigma=1e9", "method.group_lasso=100")
    for task in stream.tasks:
        method.learn(task)
    assert method.events[1] == {"added": 9, "pruned": 9, "split": 0}
    assert method.widths[1] == [8, 16, 32] and [len(n[0]) for n in method.norms[1]] == [8, 16, 32]


def test_conv_split_channels_old_copy_serves_the_old_task():
    """Every drifted channel is split: its filter gets task 0's values back and task 0's batch norm is its own, so
    task 0's logits are bit-identical; the copies carry the new filters."""
    method, stream, _ = make(*CONV, "method.k=1000", "method.tau=1e9", "method.sigma=0")
    method.learn(stream.tasks[0])
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    old = [w.clone() for w in method.weights]
    norms = [[t.clone() for t in n] for n in method.norms[0]]
    method.learn(stream.tasks[1])
    assert method.events[1]["split"] == 8 + 16 + 32 and method.widths[1] == [16, 32, 64]
    assert torch.equal(method.predict(x, 0), before)
    assert all(
        torch.equal(a, b) for n, m in zip(norms, method.norms[0], strict=True) for a, b in zip(n, m, strict=True)
    )
    assert torch.equal(method.weights[0][:8], old[0]) and torch.equal(method.weights[1][:16, :8], old[1])
    assert not torch.equal(method.weights[0][8:], old[0])


def test_vgg16_bn_flatten_gives_each_channel_its_positions():
    """vgg16_bn on 64x64 images: the flatten hands the first linear layer 2x2 positions per channel; expansion
    and splitting grow all 15 layers, and task 0 still predicts with its own channels only."""
    method, stream, cfg = make(
        "backbone=vgg16_bn",
        "backbone.width=0.125",
        "method.train.batch_size=16",
        "method.train.iterations=2",
        "method.k=2",
        "method.tau=0",
        "method.sigma=0",
        "method.group_lasso=0",
    )
    big = [  # each pixel repeated 2x2
        dataclasses.replace(
            t,
            **{
                s: Split(getattr(t, s).x.repeat_interleave(2, 2).repeat_interleave(2, 3), getattr(t, s).y)
                for s in ("train", "test")
            },
        )
        for t in stream.tasks
    ]
    stream = dataclasses.replace(stream, tasks=big, input_shape=(3, 64, 64))
    method = DEN(cfg.method, cfg.backbone, stream, method.hw)
    assert [layer.repeat for layer in method.layers[-3:]] == [1, 4, 1] and method.weights[13].shape[1] == 64 * 4
    for task in stream.tasks:
        method.learn(task)
    split = method.events[1]["split"]
    assert method.events[1]["added"] == 2 * 15 and 0 < split <= 2 * 15
    assert all(old + 2 <= new <= old + 4 for old, new in zip(method.widths[0], method.widths[1], strict=True))
    assert method.weights[13].shape[1] == method.widths[1][12] * 4
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    garble_later_units(method, 0)
    assert torch.equal(method.predict(x, 0), before)


def test_refuses_residual_backbones():
    with pytest.raises(ClrunError, match="mlp, convnet, vgg16_bn"):
        make("backbone=resnet18")


@needs_shared("MNIST")
def test_learns_split_mnist_above_chance(tmp_path):
    real = ["stream=split_mnist", f"data.root={SHARED_DATA}", "stream.n_tasks=2", "stream.train_per_task=256"]
    row, run_dir = run(tmp_path, *TINY, *real, "stream.test_per_task=200", "method.train.iterations=30")
    acc = matrix(run_dir)
    assert acc[0, 0] > 0.9 and acc[1, 1] > 0.8  # 2-class tasks: chance 0.5
    assert row["expansion"] > 1


@needs_shared("MNIST")
def test_conv_learns_split_mnist_above_chance(tmp_path):
    real = ["stream=split_mnist", f"data.root={SHARED_DATA}", "stream.n_tasks=2", "stream.train_per_task=256"]
    conv = ["backbone=convnet", "method.train.batch_size=64", "method.k=4"]
    row, run_dir = run(tmp_path, *TINY, *real, *conv, "stream.test_per_task=200", "method.train.iterations=30")
    acc = matrix(run_dir)
    assert acc[0, 0] > 0.9 and acc[1, 1] > 0.8  # 2-class tasks: chance 0.5
    assert row["expansion"] > 1
