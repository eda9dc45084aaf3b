"""CCGN: binary test gates, sparsity closes gates, earlier tasks' logits bit-identical, learning, footprint."""

import pytest
import torch
from conftest import SHARED_DATA, build_method, matrix, needs_shared, run, task_inputs

TINY = [
    "method=ccgn",
    "hardware=cpu",
    "hardware.threads=1",
    "backbone=mlp",
    "backbone.width=0.25",
    "stream.n_tasks=3",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
    "method.train.iterations=20",
]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


def open_share(method, x, task) -> float:
    method.predict(x, task)
    return float(torch.cat([g.flatten() for g in method.gates.record]).mean())


@pytest.mark.parametrize(
    "overrides",
    [[], ["backbone=convnet"], ["backbone=vgg16_bn", "backbone.width=0.125"]],
    ids=["mlp", "convnet", "vgg"],
)
def test_test_gates_are_binary_and_earlier_tasks_logits_stay_bit_identical(overrides):
    method, stream, _ = make(*overrides)
    method.learn(stream.tasks[0], None)
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    gates = torch.cat([g.flatten() for g in method.gates.record])
    assert ((gates == 0) | (gates == 1)).all() and 0 < gates.mean() < 1
    for task in stream.tasks[1:]:
        method.learn(task, None)
    assert torch.equal(method.predict(x, 0), before)


def test_sparsity_objective_lowers_the_open_share():
    shares = []
    for weight in (0.0, 20.0):
        method, stream, _ = make(f"method.sparsity={weight}", "stream.n_tasks=1", "method.train.iterations=40")
        method.learn(stream.tasks[0], None)
        shares.append(open_share(method, task_inputs(stream, 0), 0))
    assert shares[1] < shares[0] - 0.2


def test_footprint_counts_shared_weights_once_and_gating_modules_per_task():
    method, stream, _ = make("stream.n_tasks=2")
    for task in stream.tasks:
        method.learn(task, None)
    d = method.layers[0].layer.in_features
    shared = d * 100 + 100 + 100 * 100 + 100
    gaters = (d * 16 + 16 + 16 * 100 + 100) + (100 * 16 + 16 + 16 * 100 + 100)  # per task, by hand
    heads = 2 * (2 * 100 + 2)
    assert method.footprint().params == shared + heads + 2 * gaters
    assert method.footprint().base_params == shared + 2 * 100 + 2


@needs_shared("MNIST")
def test_learns_split_mnist_above_chance(tmp_path):
    real = ["stream=split_mnist", f"data.root={SHARED_DATA}", "stream.n_tasks=2", "stream.train_per_task=256"]
    _, run_dir = run(tmp_path, *TINY, *real, "stream.test_per_task=200", "method.train.iterations=30")
    acc = matrix(run_dir)
    assert acc[0, 0] > 0.9 and acc[1, 1] > 0.8 and acc[1, 0] == acc[0, 0]  # chance 0.5; no forgetting
