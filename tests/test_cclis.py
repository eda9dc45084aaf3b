"""CCLIS: importance scores and sampling, the IS-SupCon loss, PRD, the buffer's budget, learning, resume, a CLI run."""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    SPLIT_MNIST_CLASS,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    learn_and_score,
    needs_shared,
    one_line_error,
)
from rich.console import Console

from clrun.data.stream import Split, Task
from clrun.methods.cclis import CCLIS, importance_scores, importance_select, is_supcon_loss, prd_loss
from clrun.results import count_params, module_bytes

TINY = [
    *TINY_STREAM,
    "backbone=mlp",
    "backbone.width=0.1",
    "method=cclis",
    "method.train.iterations=4",
    "method.train.batch_size=16",
    "method.linear.iterations=4",
    "method.linear.batch_size=16",
    "method.score_passes=2",
    "stream.scenario=class",
]


def make(*overrides):
    method, stream, _ = build_method(CCLIS, *TINY, *overrides)
    return method, stream


def test_importance_scores_by_hand():
    # 2 classes, 3 candidates labelled (0, 1, 1); two passes of exp(similarity / T):
    #   pass 1 rows (1, 1, 2) and (2, 1, 1) normalise to (.25, .25, .5) and (.5, .25, .25);
    #   pass 2 rows (1, 3, 0) and (1, 1, 2) normalise to (.25, .75, 0) and (.25, .25, .5).
    # Other-class entries average over the passes: row 1 of image 0 (.5 + .25) / 2 = .375, row 0 of image 1
    # (.25 + .75) / 2 = .5, of image 2 (.5 + 0) / 2 = .25; own-class entries keep the last pass over 2 (the code's
    # accumulation): image 0 .25 / 2, image 1 .25 / 2, image 2 .5 / 2. Score: the column sum over (2 - 1).
    passes = [torch.tensor([[1.0, 1, 2], [2, 1, 1]]), torch.tensor([[1.0, 3, 0], [1, 1, 2]])]
    scores = importance_scores(passes, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(scores, torch.tensor([0.375 + 0.125, 0.5 + 0.125, 0.25 + 0.25], dtype=torch.float64))


def test_importance_selection_quotas_weights_and_unbiased_replay_by_hand():
    # after 2 tasks, budget 4: the earlier class 0 (3 held, scores 1, 1, 2) keeps 1/2 x 4 = 2; the new classes 2 and
    # 3 take (4 - 2) / 2 = 1 each; each weight is the pick's score over its class's candidates' sum
    old_scores, old_labels = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0, 0, 0])
    new_scores, new_labels = torch.tensor([3.0, 1.0, 1.0, 1.0]), torch.tensor([2, 2, 3, 3])
    torch.manual_seed(0)
    old, old_w, new, new_w = importance_select(old_scores, old_labels, new_scores, new_labels, 4, 2)
    assert len(old) == 2 and sorted(new_labels[new].tolist()) == [2, 3]
    torch.testing.assert_close(old_w, (old_scores / 4)[old].double())
    class_sums = torch.tensor([0.0, 0.0, 4.0, 2.0])  # classes 2 and 3: scores 3 + 1 and 1 + 1
    torch.testing.assert_close(new_w, (new_scores[new] / class_sums[new_labels[new]]).double())
    # one pick from a class (budget 2 over 2 tasks, one earlier class): drawn with probability score / sum, so
    # f(pick) / weight(pick) estimates the class's sum of f without bias (the importance-sampling identity)
    f = torch.tensor([5.0, -1.0, 2.0])
    draws, estimates = [], []
    for _ in range(3000):
        index, weight, _, _ = importance_select(old_scores, old_labels, new_scores[:0], new_labels[:0], 2, 2)
        draws.append(index.item())
        estimates.append((f[index] / weight).item())
    frequency = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(frequency, [0.25, 0.25, 0.5], atol=0.03)
    # the estimate takes 20, -4, 4 with probabilities .25, .25, .5: mean 6, std 8.7, so 3000 draws: 4 std errors .64
    assert np.mean(estimates) == pytest.approx(f.sum().item(), abs=0.64)


def test_is_supcon_loss_by_hand():
    # classes 0, 1 earlier (first current class 2); batch labels (0, 1, 1, 2), weights (.5, .3, .2, .1), so each
    # image's class count in the batch is (1, 2, 2, 1) and c_j = weight x count = (.5, .6, .4, .1).
    s = torch.tensor([[0.9, 0.1, -0.2, 0.3], [0.2, 0.8, 0.7, -0.1], [-0.3, 0.0, 0.1, 0.95]], dtype=torch.float64)
    labels, weights, T = torch.tensor([0, 1, 1, 2]), torch.tensor([0.5, 0.3, 0.2, 0.1], dtype=torch.float64), 0.5
    e = [[math.exp(v / T) for v in row] for row in s.tolist()]
    # anchor 0 (earlier): its negatives of the other earlier class (images 1, 2) divided by c; image 3 (current) not
    d0 = e[0][0] + e[0][1] / 0.6 + e[0][2] / 0.4 + e[0][3]
    d1 = e[1][0] / 0.5 + e[1][1] + e[1][2] + e[1][3]  # anchor 1: image 0 is its one earlier-class negative
    d2 = sum(e[2])  # anchor 2 (current): no correction
    terms = [math.log(e[0][0] / d0), math.log(e[1][1] / d1), math.log(e[1][2] / d1), math.log(e[2][3] / d2)]
    assert is_supcon_loss(s, labels, weights, 2, T).item() == pytest.approx(-sum(terms) / 4, rel=1e-9)
    # anchors: current (Co2L's asymmetric form): only class 2's prototype anchors
    assert is_supcon_loss(s, labels, weights, 2, T, "current").item() == pytest.approx(-terms[3], rel=1e-9)
    # no earlier classes (first task): plain prototype SupCon, weights unused
    plain = is_supcon_loss(s, labels, torch.ones(4), 0, T)
    assert plain.item() == pytest.approx(
        -(
            math.log(e[0][0] / sum(e[0]))
            + math.log(e[1][1] / sum(e[1]))
            + math.log(e[1][2] / sum(e[1]))
            + math.log(e[2][3] / sum(e[2]))
        )
        / 4
    )


def test_prd_is_at_its_minimum_when_student_equals_teacher():
    # PRD is a cross-entropy: with the student equal to the teacher (same network, same temperature) it equals the
    # teacher's entropy, its KL part is zero and so is its gradient; at the code's temperatures (.2 vs .1) it is not
    method, stream = make()
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    teacher = copy.deepcopy(method.net).eval()
    method.net.eval()
    x = stream.prepare(stream.tasks[1].train.x[:20], train=False)
    _, student_out = method.net(x)
    with torch.no_grad():
        _, teacher_out = teacher(x)
    loss = prd_loss(student_out, teacher_out, 2, 0.1, 0.1)
    p = torch.softmax(teacher_out[:2] / 0.1, 0)
    entropy = -(p * p.log()).sum(0).mean()
    assert loss.item() - entropy.item() == pytest.approx(0.0, abs=1e-6)
    gradient = torch.autograd.grad(loss, list(method.net.parameters()), allow_unused=True, retain_graph=True)
    assert max(g.abs().max().item() for g in gradient if g is not None) < 1e-6
    other = prd_loss(student_out, teacher_out, 2, 0.2, 0.1)
    gradient = torch.autograd.grad(other, list(method.net.parameters()), allow_unused=True)
    assert max(g.abs().max().item() for g in gradient if g is not None) > 1e-4


def unequal_task(index: int, offset: int, n_classes: int, n: int, shape) -> Task:
    generator = torch.Generator().manual_seed(index)
    split = Split(
        torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator), torch.arange(n) % n_classes
    )
    return Task(index, f"task{index}", list(range(offset, offset + n_classes)), split, split)


@pytest.mark.parametrize("budget", [5, 23])  # 5 is fewer than the 9 classes
def test_buffer_stays_within_budget_over_unequal_tasks_and_is_counted(budget):
    method, stream = make(f"method.replay.budget={budget}")
    shapes = [(3, 40), (1, 9), (5, 60)]
    offsets = [0, 3, 4]
    stream.tasks[:] = [unequal_task(i, offsets[i], c, n, stream.input_shape) for i, (c, n) in enumerate(shapes)]
    method.n_classes = 9
    method.net.prototypes = torch.nn.Linear(method.cfg.feat_dim, 9, bias=False)
    for task in stream.tasks:
        row = method.learn(task)
        memory = method.memory
        assert row["buffer"] == len(memory) <= budget and len(memory) == len(memory.w)
        assert (memory.w > 0).all() and (memory.w <= 1).all()
        stored = len(memory) * (memory.x[0].numel() + 8 + 8 + 4)  # uint8 image, int64 label and task, fp32 weight
        extra = module_bytes(method.net.head) + module_bytes(method.net.prototypes)
        assert method.footprint().bytes == module_bytes(method.model) + extra + stored
        assert method.footprint().params == count_params(method.model) + count_params(method.net.head) + 9 * 128
    assert len(method.memory) == budget  # 109 images offered: the budget is filled


def test_domain_scenario_and_other_policies_are_refused():
    one_line_error("does not support stream.scenario=domain", make, "stream.scenario=domain")
    one_line_error("replay.policy class_balanced", make, "method.replay.policy=reservoir")
    one_line_error("replay.budget >= 1", make, "method.replay.budget=0")


def class_il_accuracy(method, stream) -> float:
    x = torch.cat([stream.prepare(task.test.x, train=False) for task in stream.tasks])
    y = torch.cat([task.test.y + stream.class_offset(task.index) for task in stream.tasks])
    return (method.predict_agnostic(x, len(stream.tasks))[0].argmax(1) == y).float().mean().item()


@needs_shared("MNIST")
@pytest.mark.parametrize("seed", [0, 1])
def test_learns_a_tiny_split_mnist_and_keeps_the_first_task(seed):
    tiny = [
        *SPLIT_MNIST_CLASS,
        "backbone.width=0.25",
        "method=cclis",
        "stream.n_tasks=2",
        "method.train.lr=0.1",
        "method.train.iterations=50",
        "method.train.batch_size=128",
        "method.linear.iterations=50",
        "method.replay.budget=50",
        "method.score_passes=2",
        f"seed={seed}",
    ]
    method, stream, _ = build_method(CCLIS, *tiny)
    accuracy = learn_and_score(method, stream)
    frozen, _, _ = build_method(CCLIS, *tiny, "method.train.lr=0", "method.prototypes.lr=0")
    learn_and_score(frozen, stream)
    # seeds 0-1: task 0 (digits 0, 1) .99 after it and .97-.98 after task 1; class-IL over the four digits .70-.74,
    # against .47-.57 for the same linear classifier on the untrained network (contrastive stage at lr 0)
    assert accuracy[0, 0] > 0.95 and accuracy[1, 0] > 0.9, accuracy
    assert class_il_accuracy(method, stream) > class_il_accuracy(frozen, stream) + 0.1


def test_resume_equals_uninterrupted(tmp_path):
    assert_resume_is_bit_identical(tmp_path, *TINY, "method.replay.budget=9", "method.views=2")


def test_clrun_runs_cclis_as_a_user_would(tmp_path):
    done = clrun(tmp_path, *TINY, "method.replay.budget=10")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("cclis-synthetic-mlp-")
    tasks = pd.read_parquet(run_dir / "tasks.parquet")
    assert (tasks["buffer"] == 10).all()
    summary = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    assert 0 <= summary["acc"] <= 1 and summary["scenario"] == "class"


def test_scenarios_mnist_runs_cclis_in_the_class_scenario_only(monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scenarios_mnist as sm  # a script beside the package, not part of it

    calls = []
    monkeypatch.setattr(sm, "run_clrun", lambda args, console: calls.append(args) or 1.0)
    assert sm.run_protocol("split_mnist", ["cclis"], tmp_path, [], [], sm.SCENARIOS, Console(quiet=True)) == 1.0
    assert [call[1:3] for call in calls] == [["experiment=vdv_split_mnist_class", "method=cclis"]]
    calls.clear()  # at two budgets: one multirun over them
    assert sm.run_protocol("split_mnist", ["cclis"], tmp_path, [], [200, 500], sm.SCENARIOS, Console(quiet=True))
    assert [call[1:4] for call in calls] == [
        ["experiment=vdv_split_mnist_class", "method=cclis", "replay.budget=200,500"]
    ]
