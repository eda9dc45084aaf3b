"""Expert Gate: experts and gates per task, relatedness-based init, gate-chosen experts without task ids, resume."""

import math

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

from clrun.methods.expert_gate import ExpertGate
from clrun.models import TaskModel
from clrun.train import FitStats

TINY = [
    *TINY_STREAM,
    "method=expert_gate",
    "method.train.iterations=4",
    "method.gate_train.iterations=4",
    "method.train.batch_size=32",
    "method.gate_train.batch_size=32",
    "method.latent=8",
]
MLP = ["backbone=mlp", "backbone.hidden=[16,12]"]
CONVNET = ["backbone=convnet", "backbone.width=0.125"]


def make(*overrides):
    return build_method(ExpertGate, *TINY, *overrides)[:2]


def test_footprint_counts_every_expert_and_every_autoencoder():
    method, stream = make(*MLP)
    expert = 3072 * 16 + 16 + 16 * 12 + 12 + 12 * 2 + 2
    gate = 3072 * 8 + 8 + 8 * 3072 + 3072
    for task in stream.tasks:
        method.learn(task)
        footprint = method.footprint()
        n = task.index + 1
        assert (footprint.params, footprint.bytes, footprint.base_params) == (
            n * (expert + gate),
            4 * n * (expert + gate),
            expert,
        )


def test_new_expert_starts_from_the_most_related_one(monkeypatch):
    method, stream = make(*MLP)
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    fit = method.fit

    def gates_only(task, module, *args, **kwargs):  # the experts keep their initial weights
        return FitStats(0, 0, 0.0, math.nan) if isinstance(module, TaskModel) else fit(task, module, *args, **kwargs)

    monkeypatch.setattr(method, "fit", gates_only)
    row = method.learn(stream.tasks[2])
    errors = method.mean_errors(stream.tasks[2])
    rel = [1 - (e - errors[2]) / errors[2] for e in errors[:2]]
    assert method.relatedness[2] == pytest.approx([float(r) for r in rel])
    assert row["parent"] == int(np.argmax(method.relatedness[2])) == int(errors[:2].argmin())
    new, parent = method.experts[2].backbone.state_dict(), method.experts[row["parent"]].backbone.state_dict()
    assert all(torch.equal(new[k], parent[k]) for k in new)


@pytest.mark.parametrize("backbone", [MLP, CONVNET])
@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_gate_with_lowest_error_picks_the_expert_and_earlier_logits_stay(backbone, scenario):
    method, stream = make(*backbone, f"stream.scenario={scenario}")
    x, before = task_inputs(stream, 0), None
    for task in stream.tasks:
        method.learn(task)
        if before is not None:
            assert torch.equal(method.predict(x, 0), before)  # every expert is its own network
        before = method.predict(x, 0).clone()
    logits, inferred = method.predict_agnostic(x, 3)
    assert torch.equal(inferred, method.gate_errors(x).argmin(0))
    for i, t in enumerate(inferred.tolist()):
        own = method.predict(x[i : i + 1], t)[0]
        if scenario == "domain":
            torch.testing.assert_close(logits[i], own)
        else:
            torch.testing.assert_close(logits[i, 2 * t : 2 * t + 2], own)
            assert torch.isinf(logits[i]).sum() == 4


def test_resume_after_task_2_equals_uninterrupted(tmp_path):
    overrides = [*TINY, *MLP, "stream.scenario=class"]
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))


@needs_shared("MNIST", "raw")
def test_gates_find_the_task_of_real_split_mnist_in_the_class_scenario(tmp_path):
    method, stream = build_method(
        ExpertGate,
        *TINY,
        *MLP,
        "stream=split_mnist",
        "stream.scenario=class",
        f"data.root={SHARED_DATA}",
        "stream.n_tasks=5",
        "stream.train_per_task=256",
        "stream.test_per_task=100",
        "method.train.iterations=30",
        "method.gate_train.iterations=60",
        "method.latent=32",
    )[:2]
    for task in stream.tasks:
        method.learn(task)
    found = [(method.predict_agnostic(task_inputs(stream, j), 5)[1] == j).float().mean() for j in range(5)]
    assert float(sum(found)) / 5 > 0.6  # chance: 0.2
