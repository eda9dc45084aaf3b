"""MNTDP-D: earlier logits bit-identical, the kNN prior, the exhaustive search keeping the best candidate, the
backbones cut into blocks, resume, the CLI, learning on MNIST with transfer from the kNN-chosen task."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    build_method,
    clrun,
    matrix,
    needs_shared,
    one_line_error,
    run,
    run_interrupted_then_resumed,
    snapshot,
    task_inputs,
    unchanged,
)
from omegaconf import OmegaConf

from clrun.data.stream import Split
from clrun.methods import mntdp
from clrun.models import build_backbone
from clrun.models.blocks import cut_blocks

ONE = ["method.lrs=[0.01]", "method.weight_decays=[0]"]
TINY = [*TINY_STREAM, "method=mntdp", "backbone=mlp", "backbone.width=0.25", "method.train.epochs=2", *ONE]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


@pytest.mark.parametrize("backbone", ["mlp", "convnet"])
def test_earlier_logits_and_modules_stay_bit_identical(backbone):
    method, stream, _ = make(f"backbone={backbone}", "backbone.width=0.25", "method.weight_decays=[0,0.01]")
    logits, states = [], []
    for task in stream.tasks:
        row = method.learn(task)
        assert row["candidates"] == 2 * (1 if task.index == 0 else method.n_blocks + 1)  # x 2 grid points
        for j, before in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), before), f"task {j} after {task.index}"
        assert all(unchanged(module, state) for module, state in states)
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        states = [(m, snapshot(m)) for block in method.library for m in block]


def test_knn_accuracy_votes_among_the_nearest():
    train = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert mntdp.knn_accuracy(train, labels, torch.tensor([[0.05], [5.05]]), torch.tensor([0, 1]), 3) == 1.0
    assert mntdp.knn_accuracy(train, labels, torch.tensor([[0.05]]), torch.tensor([1]), 5) == 1.0  # 3 of 5 vote 1
    tie = torch.tensor([[0.0], [1.0]]), torch.tensor([1, 0])
    assert mntdp.knn_accuracy(*tie, torch.tensor([[0.5]]), torch.tensor([0]), 2) == 1.0  # a tie: the lowest label


def test_search_keeps_the_candidate_with_the_best_validation_accuracy(monkeypatch):
    method, stream, _ = make("method.lrs=[0.01,0.001]")
    method.learn(stream.tasks[0])
    for best in (0, 3, 5):  # candidates in order: reuse 0 (lr 0.01, 0.001), reuse 1 (...), reuse 2 (...)
        scores = iter([0.5 + 0.1 * (i == best) for i in range(6)])
        monkeypatch.setattr(mntdp, "accuracy", lambda *args, scores=scores, **keys: next(scores))
        row = method.learn(stream.tasks[1])
        assert (row["reused"], row["lr"]) == (best // 2, [0.01, 0.001][best % 2])
        assert method.paths[-1][: best // 2] == method.paths[0][: best // 2]  # the source's modules, shared
        assert all(method.paths[-1][i] == len(method.library[i]) - 1 for i in range(best // 2, method.n_blocks))
        method.paths.pop(), method.heads.pop(-1)


def test_prior_picks_the_task_whose_features_fit_the_new_one(monkeypatch):
    method, stream, _ = make("method.max_reuse=0")
    for task in stream.tasks[:2]:
        method.learn(task)
    again = replace(stream.tasks[1], index=2)  # task 1 again: its own features separate it best
    source, scores = method.prior(again, again.train, again.test)
    assert source == 1 and scores[1] == max(scores)
    monkeypatch.setattr(mntdp, "knn_accuracy", lambda *args: 0.5)  # a tie goes to the later task
    assert method.prior(stream.tasks[2], stream.tasks[2].train, stream.tasks[2].test)[0] == 1


@pytest.mark.parametrize(
    "overrides", [["backbone=mlp"], ["backbone=convnet"], ["backbone=vgg16_bn"], ["backbone=resnet18"]]
)
def test_blocks_compose_to_the_backbone(overrides):
    cfg = OmegaConf.create({"name": overrides[0].split("=")[1], "width": 0.125, "pretrained": None, "hidden": [16]})
    backbone = build_backbone(cfg, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = cut_blocks(backbone, cfg.name)
    h = x
    for block in blocks:
        h = block(h)
    assert torch.equal(h, backbone(x))
    assert len(blocks) == {"mlp": 1, "convnet": 3, "vgg16_bn": 15, "resnet18": 5}[cfg.name]


def test_a_backbone_that_cannot_be_cut_is_refused_in_one_line():
    one_line_error(
        "backbone.name=sphereface20 cannot be cut into blocks", cut_blocks, torch.nn.Linear(1, 1), "sphereface20"
    )


def test_resume_equals_uninterrupted(tmp_path):
    _, straight = run(tmp_path, *TINY)
    resumed = run_interrupted_then_resumed(tmp_path, *TINY, after_tasks=2)
    np.testing.assert_array_equal(matrix(straight), matrix(resumed))


def test_cli_runs_mntdp_and_refuses_the_class_scenario_without_task_id(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=class", "method.task_id=confidence")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = clrun(tmp_path, *TINY, "stream.scenario=class")
    assert refused.returncode != 0 and "mntdp" in refused.stderr + refused.stdout


@needs_shared("MNIST")
def test_transfers_from_the_knn_chosen_task_on_mnist():
    """Mini-S-: digits 0-4 (2000 images), 5-9, then digits 0-4 again from 40 images: the prior picks task 0, and
    reusing its modules beats a path of new modules trained on the 40 images; nothing is forgotten."""
    split = ["stream=split_mnist", f"data.root={SHARED_DATA}", "stream.classes_per_task=5", "stream.n_tasks=2"]
    sizes = ["stream.train_per_task=2000", "stream.test_per_task=500", "backbone.hidden=[64,64]"]
    method, stream, _ = build_method(None, *TINY, *split, *sizes)
    for task in stream.tasks:
        method.learn(task)
    first = stream.tasks[0]
    again = replace(first, index=2, name="0-4 again", train=Split(first.train.x[:40], first.train.y[:40]))
    before = method.test_accuracy(first)
    stream.tasks.append(again)
    row = method.learn(again)
    assert row["source"] == 0 and row["reused"] >= 1
    _, alone, _, _ = method.train_candidate(again, [], 0.01, 0.0, again.train, again.test)
    assert method.test_accuracy(again) > alone + 0.05
    assert method.test_accuracy(first) == before
