"""CLNP: bit-identical earlier tasks, the interference cut, the margin's threshold search, freed units reused,
resume, the CLI, learning on MNIST."""

import pytest
import torch
from conftest import (
    SPLIT_MNIST_3,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    learn_and_score,
    needs_shared,
    task_inputs,
)

from clrun.errors import ClrunError
from clrun.methods.clnp import FREE, largest_prune

TINY = [*TINY_STREAM, "method=clnp", "backbone=mlp", "backbone.width=0.25", "method.train.epochs=2"]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


@pytest.mark.parametrize(
    "overrides",
    [[], ["backbone=convnet", "method.train.optimizer=sgd", "method.train.weight_decay=0.01"]],
    ids=["mlp-adam", "convnet-sgd-wd"],
)
def test_earlier_logits_stay_bit_identical_and_free_units_are_cut_off(overrides):
    method, stream, _ = make(*overrides)
    logits = []
    for task in stream.tasks:
        method.learn(task)
        for j, before in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), before), f"task {j} after task {task.index}"
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        # interference cut: no weight from a unit free or owned by a later task into an earlier task's unit
        for gated in method.layers[1:]:
            below = method.owner[gated.input_gate].repeat_interleave(gated.input_repeat)
            weight = gated.layer.weight.flatten(2).abs().sum(2) if gated.layer.weight.dim() > 2 else gated.layer.weight
            owner = method.owner[method.layers.index(gated)]
            for t in range(task.index + 1):
                later = (below == FREE) | (below > t)
                assert weight[owner == t][:, later].eq(0).all()


def test_largest_prune_is_the_most_pruning_within_the_margin():
    accuracy = [0.98, 0.98, 0.979, 0.976, 0.974, 0.90, 0.50]  # falls with the number of units pruned
    asked = []

    def accuracy_of(k):
        asked.append(k)
        return accuracy[k]

    assert largest_prune(6, accuracy_of, 0.98 - 0.005) == 3
    assert len(asked) <= 3  # bisection, not a scan
    assert largest_prune(6, accuracy.__getitem__, 0.98 - 0.5) == 6
    assert largest_prune(6, accuracy.__getitem__, 0.99) == 0


def test_prune_keeps_the_active_units_within_the_margin_and_frees_the_rest_for_the_next_task():
    method, stream, _ = make("method.margin=0.05")
    row = method.learn(stream.tasks[0])
    assert row["prune_cost"] <= 0.05 and 0 < row["pruned"] < 1
    freed = [o == FREE for o in method.owner]
    kept = [o == 0 for o in method.owner]
    assert any(f.any() for f in freed) and any(k.any() for k in kept)
    before = [g.layer.weight.detach().clone() for g in method.layers]
    method.learn(stream.tasks[1])
    for gated, f, k, weight in zip(method.layers, freed, kept, before, strict=True):
        assert torch.equal(gated.layer.weight[k], weight[k])  # task 0's units never move
        assert not torch.equal(gated.layer.weight[f], weight[f])  # the freed ones are trained again
    assert any(((o == 1) & f).any() for o, f in zip(method.owner, freed, strict=True))  # and serve task 1
    assert all(torch.equal(o[k], torch.zeros_like(o[k])) for o, k in zip(method.owner, kept, strict=True))


def test_residual_backbones_are_refused():
    with pytest.raises(ClrunError, match="chain backbones only"):
        make("backbone=resnet18", "backbone.width=0.125")


def test_resume_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "backbone=convnet", "stream.train_per_task=32", "stream.test_per_task=16"]
    assert_resume_is_bit_identical(tmp_path, *overrides)  # weights, masks, buffers


def test_cli_runs_clnp_and_class_scenario_with_task_inference(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=class", "method.task_id=entropy")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = clrun(tmp_path, *TINY, "stream.scenario=class")
    assert refused.returncode != 0 and "clnp" in refused.stderr + refused.stdout


@needs_shared("MNIST")
def test_learns_split_mnist_with_zero_forgetting():
    method, stream, _ = build_method(
        None,
        *TINY,
        *SPLIT_MNIST_3,
        "method.train.epochs=3",
    )
    accuracy = learn_and_score(method, stream)
    assert min(accuracy[j, j] for j in range(3)) > 0.9
    assert all(accuracy[2, j] == accuracy[j, j] for j in range(3))
    assert 0 < method.summary()["free_units"] < 1
