"""CCGN: binary test gates, sparsity closes gates, earlier tasks' logits bit-identical, learning, footprint;
the task classifier: scenarios, a frozen gated network, its accuracy on split MNIST, footprint, resume."""

import math

import numpy as np
import pytest
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    build_method,
    compose_config,
    matrix,
    needs_shared,
    run,
    run_interrupted_then_resumed,
    task_inputs,
)

from clrun.errors import ClrunError
from clrun.methods.ccgn import CCGN
from clrun.methods.parts.replay import Memory, herding

TINY = [
    *TINY_STREAM,
    "method=ccgn",
    "backbone=mlp",
    "backbone.width=0.25",
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
    method.learn(stream.tasks[0])
    x = task_inputs(stream, 0)
    before = method.predict(x, 0)
    gates = torch.cat([g.flatten() for g in method.gates.record])
    assert ((gates == 0) | (gates == 1)).all() and 0 < gates.mean() < 1
    for task in stream.tasks[1:]:
        method.learn(task)
    assert torch.equal(method.predict(x, 0), before)


def test_sparsity_objective_lowers_the_open_share():
    shares = []
    for weight in (0.0, 20.0):
        method, stream, _ = make(f"method.sparsity={weight}", "stream.n_tasks=1", "method.train.iterations=40")
        method.learn(stream.tasks[0])
        shares.append(open_share(method, task_inputs(stream, 0), 0))
    assert shares[1] < shares[0] - 0.2


def test_footprint_counts_shared_weights_once_and_gating_modules_per_task():
    method, stream, _ = make("stream.n_tasks=2")
    for task in stream.tasks:
        method.learn(task)
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


def test_herding_memory_holds_each_class_picks_on_its_task_branch_features():
    budget = 8
    method, stream, _ = make(
        "stream.scenario=class", "stream.n_tasks=2", "method.memory.policy=herding", f"method.memory.budget={budget}"
    )
    for task in stream.tasks:
        method.learn(task)
        images = stream.prepare(task.train.x, train=False)  # as at test time
        features = method.features(images, task.index)
        quota = budget // (2 * (task.index + 1))  # two classes per task
        for c in range(2):
            index = torch.nonzero(task.train.y == c).squeeze(1)
            picks = task.train.x[index[herding(features[index], quota)]]
            stored = method.memory.x[(method.memory.t == task.index) & (method.memory.y == c)]
            assert torch.equal(stored, picks)


def test_task_classifier_opens_class_and_domain_and_task_id_still_replaces_it():
    assert CCGN.supported_scenarios(compose_config("method=ccgn").method) == ("task", "class", "domain")
    assert CCGN.supported_scenarios(compose_config("method=ccgn", "method.task_classifier=false").method) == ("task",)
    with pytest.raises(ClrunError, match="memory.budget"):
        make("stream.scenario=class", "method.memory.budget=0")
    method, stream, _ = make("stream.scenario=class", "stream.n_tasks=2", "method.task_id=entropy")
    for task in stream.tasks:
        method.learn(task)
    assert method.classifier is None and len(method.memory) == 0  # the entropy rule instead: no classifier, no memory
    method, stream, _ = make("stream.n_tasks=2")  # the task scenario needs neither
    for task in stream.tasks:
        method.learn(task)
    assert method.classifier is None and len(method.memory) == 0


def test_training_the_task_classifier_leaves_the_gated_network_bit_identical():
    overrides = (
        "backbone=convnet",
        "stream.scenario=class",
        "stream.n_tasks=2",
        "method.classifier_train.iterations=10",
    )
    method, stream, _ = make(*overrides)  # convnet: batch norm too
    for task in stream.tasks:
        method.learn(task)
    inputs = [task_inputs(stream, k) for k in range(2)]
    before = [method.predict(x, k) for k, x in enumerate(inputs)]
    network = [t.clone() for t in [*method.model.state_dict().values(), *method.gaters.state_dict().values()]]
    old_classifier = [p.clone() for p in method.classifier.parameters()]
    loss = method.train_classifier(stream.tasks[1])
    assert math.isfinite(loss) and not all(
        torch.equal(a, b) for a, b in zip(old_classifier, method.classifier.parameters(), strict=True)
    )
    after = [*method.model.state_dict().values(), *method.gaters.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(network, after, strict=True))  # batch-norm statistics included
    assert all(torch.equal(method.predict(x, k), b) for k, (x, b) in enumerate(zip(inputs, before, strict=True)))


def test_footprint_counts_the_task_classifier_and_the_memory():
    method, stream, _ = make("stream.scenario=class", "stream.n_tasks=2", "method.classifier_train.iterations=2")
    for task in stream.tasks:
        method.learn(task)
    full = method.footprint()
    classifier = 2 * 100 * 64 + 64 + 64 * 2 + 2  # two branches of 100 features -> 64 hidden -> 2 tasks, by hand
    images = 2 * 64  # both tasks' 64 training images fit the budget of 1000
    method.classifier, method.memory = None, Memory(0, "class_balanced")
    bare = method.footprint()
    assert full.params - bare.params == classifier
    assert full.bytes - bare.bytes == 4 * classifier + images * (3 * 32 * 32 + 8 + 8)  # uint8 images, int64 y and t


@needs_shared("MNIST")
def test_task_classifier_identifies_split_mnist_tasks(tmp_path):
    real = [
        "backbone=mlp",
        "backbone.width=0.25",
        "hardware=cpu",
        "hardware.threads=1",
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.scenario=class",
        "stream.n_tasks=3",
        "stream.train_per_task=1000",
        "stream.test_per_task=300",
        "method.train.iterations=100",
    ]
    summary, _ = run(tmp_path, *real, "method=ccgn", "method.classifier_train.iterations=100")
    finetune, _ = run(tmp_path, *real, "method=finetune", name="finetune")
    assert summary["task_id_acc"] > 0.7  # chance 1/3
    assert summary["acc"] > 0.7 and summary["acc"] > finetune["acc"] + 0.3  # chance 1/6; finetune about 1/3
    assert summary["task_aware_acc"] > 0.9


@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_resumed_run_with_the_task_classifier_matches_an_uninterrupted_one(tmp_path, scenario):
    overrides = [*TINY, f"stream.scenario={scenario}", "method.classifier_train.iterations=10"]
    _, straight = run(tmp_path, *overrides)
    resumed = run_interrupted_then_resumed(tmp_path, *overrides)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))  # NaN (class: tasks not yet seen) equal too


def test_state_dict_restores_the_task_classifier_and_the_memory():
    overrides = ("stream.scenario=class", "stream.n_tasks=2", "method.classifier_train.iterations=10")
    method, stream, _ = make(*overrides)
    for task in stream.tasks:
        method.learn(task)
    restored, _, _ = make(*overrides)
    restored.load_state_dict(method.state_dict())
    x = torch.cat([task_inputs(stream, k) for k in range(2)])
    for got, want in zip(restored.predict_agnostic(x, 2), method.predict_agnostic(x, 2), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(restored.memory.x, method.memory.x) and torch.equal(restored.memory.t, method.memory.t)
