"""DEN: timestamps, expansion by k units with group-sparse pruning, split keeps old copies, learning, resume."""

import pytest
import torch
from conftest import SHARED_DATA, build_method, matrix, needs_shared, run, task_inputs

from clrun.errors import ClrunError

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
        method.learn(task, None)
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
        method.learn(task, None)
    assert method.events[1] == {"added": 6, "pruned": 6, "split": 0}  # lr * group_lasso = 0.1 per step beats their norm
    assert method.widths == [[100, 100], [100, 100]]


def test_split_restores_old_units_for_old_tasks():
    """With sigma 0 and k covering the layer, every drifted unit is split: task 0's units get their old weights
    back, so its logits are bit-identical; the copies carry the new weights."""
    method, stream, _ = make("method.k=1000", "method.tau=1e9", "method.sigma=0")
    method.learn(stream.tasks[0], None)
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    old = [w.clone() for w in method.weights]
    method.learn(stream.tasks[1], None)
    split = method.events[1]["split"]
    assert split > 0 and sum(method.widths[1]) == 200 + split
    assert torch.equal(method.predict(x, 0), before)
    assert torch.equal(method.weights[0][:100], old[0])
    assert not torch.equal(method.weights[0][100:], old[0][: len(method.weights[0]) - 100])


def test_refuses_conv_backbones():
    with pytest.raises(ClrunError, match="mlp"):
        make("backbone=convnet")


@needs_shared("MNIST")
def test_learns_split_mnist_above_chance(tmp_path):
    real = ["stream=split_mnist", f"data.root={SHARED_DATA}", "stream.n_tasks=2", "stream.train_per_task=256"]
    row, run_dir = run(tmp_path, *TINY, *real, "stream.test_per_task=200", "method.train.iterations=30")
    acc = matrix(run_dir)
    assert acc[0, 0] > 0.9 and acc[1, 1] > 0.8  # 2-class tasks: chance 0.5
    assert row["expansion"] > 1
