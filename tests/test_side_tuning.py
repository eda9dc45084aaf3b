"""Side-tuning: a frozen base, the blend with each task's side network, storage, a pretrained base, resume."""

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
from omegaconf import OmegaConf

from clrun.methods.side_tuning import SideTuning
from clrun.models import build_backbone

TINY = [
    *TINY_STREAM,
    "method=side_tuning",
    "method.train.iterations=4",
    "method.train.batch_size=32",
]
MLP = ["backbone=mlp", "backbone.hidden=[16,12]", "method.side_width=0.5"]  # side: 3072 -> 8 -> 6, then 6 -> 12
CONVNET = ["backbone=convnet", "backbone.width=0.125"]  # base 4, 8, 16 channels; side 1, 2, 4, then 4 -> 16


def make(*overrides):
    return build_method(SideTuning, *TINY, *overrides)[:2]


@pytest.mark.parametrize("backbone", [MLP, CONVNET])
def test_base_is_task_0s_model_then_frozen_and_earlier_logits_stay_bit_identical(backbone):
    method, stream = make(*backbone)
    net, logits, sides = method.net, [], []
    initial_base = snapshot(net.base)
    for task in stream.tasks:
        method.learn(task)
        if task.index == 0:
            assert not unchanged(net.base, initial_base)  # task 0 trains the base
            base = snapshot(net.base)  # weights and batch-norm statistics, frozen from now on
        assert unchanged(net.base, base)
        for j in range(task.index):
            assert torch.equal(method.predict(task_inputs(stream, j), j), logits[j])
            assert j == 0 or unchanged(net.sides[j - 1], sides[j - 1])
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        if task.index:
            sides.append(snapshot(net.sides[task.index - 1]))
    x = task_inputs(stream, 0)
    assert len(net.sides) == 2 and torch.equal(logits[0], net.heads[0](net.base(x)))  # task 0: base and head


def test_features_blend_base_and_side_with_a_learned_alpha_from_one_half():
    method, stream = make(*MLP)
    method.learn(stream.tasks[0])
    row = method.learn(stream.tasks[1])
    net, side, x = method.net, method.net.sides[0], task_inputs(stream, 1)
    alpha = torch.sigmoid(side.logit)
    assert alpha.item() == row["alpha"] != 0.5  # learned, from sigmoid(0)
    with torch.no_grad():
        expected = net.heads[1](alpha * net.base(x) + (1 - alpha) * side.project(side.net(x)))
    torch.testing.assert_close(method.predict(x, 1), expected)


def test_fixed_alpha_has_no_parameter_and_stays():
    method, stream = make(*MLP, "method.fixed_alpha=0.25")
    method.learn(stream.tasks[0])
    assert method.learn(stream.tasks[1])["alpha"] == 0.25
    side, x = method.net.sides[0], task_inputs(stream, 1)
    assert side.logit is None and side.alpha() == 0.25
    with torch.no_grad():
        expected = method.net.heads[1](0.25 * method.net.base(x) + 0.75 * side(x))
    torch.testing.assert_close(method.predict(x, 1), expected)


def test_footprint_counts_base_sides_alphas_and_heads():
    method, stream = make(*MLP)
    base = 3072 * 16 + 16 + 16 * 12 + 12
    head = 12 * 2 + 2
    side = (3072 * 8 + 8 + 8 * 6 + 6) + (6 * 12 + 12) + 1  # network, projection onto 12 features, alpha
    for task, total in zip(
        stream.tasks, [base + head, base + 2 * head + side, base + 3 * head + 2 * side], strict=True
    ):
        method.learn(task)
        footprint = method.footprint()
        assert (footprint.params, footprint.base_params, footprint.bytes) == (total, base + head, 4 * total)


def test_a_pretrained_base_is_frozen_from_the_start_and_every_task_gets_a_side(tmp_path):
    cfg = OmegaConf.create({"name": "convnet", "width": 0.125, "pretrained": None})
    path = tmp_path / "base.pt"
    torch.save(build_backbone(cfg, (3, 32, 32)).state_dict(), path)
    method, stream = make(*CONVNET, f"backbone.pretrained={path}", "method.fixed_alpha=0.5", "stream.n_tasks=2")
    pretrained = torch.load(path, weights_only=True)
    for task in stream.tasks:
        method.learn(task)
        assert unchanged(method.net.base, pretrained)
    assert len(method.net.sides) == 2 and method.net.sides[0].net.out_features == 4


@pytest.mark.parametrize(
    "scenario", [["stream.scenario=task"], ["stream.scenario=domain", "method.task_id=confidence"]]
)
def test_resume_after_task_2_equals_uninterrupted(tmp_path, scenario):
    overrides = [*TINY, *MLP, *scenario]
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    states = [
        torch.load(d / "checkpoints" / "last.pt", weights_only=True)["method"]["net"] for d in (straight, resumed)
    ]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


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
    assert np.diag(matrix(run_dir)).min() > 0.8  # chance: 0.5
    assert summary["bwt"] == 0.0
