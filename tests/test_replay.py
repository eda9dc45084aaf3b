"""The replay memory (budget, policies), with_replay's mixing weight, and ER end to end."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    SHARED_DATA,
    SPLIT_MNIST_CLASS,
    TINY_STREAM,
    build_method,
    clrun,
    compose_config,
    matrix,
    needs_shared,
    run,
)
from omegaconf import OmegaConf

from clrun import report
from clrun.data.stream import Split, Task
from clrun.errors import ClrunError
from clrun.methods import method_classes
from clrun.methods.er import ER
from clrun.methods.parts.replay import Memory, herding, with_replay
from clrun.results import Footprint
from clrun.run import run_name

TINY = [
    *TINY_STREAM,
    "backbone=mlp",
    "backbone.width=0.1",
    "method.train.iterations=4",
    "method.train.batch_size=16",
]


def make_task(index: int, n_classes: int, n: int, first_id: int) -> Task:
    """A task of `n` images whose pixels encode their id (first_id, first_id + 1, ...); labels cycle."""
    ids = torch.arange(first_id, first_id + n)
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids % 256, ids // 256
    split = Split(x, ids % n_classes)
    return Task(index, f"task{index}", list(range(n_classes)), split, split)


def ids_of(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()


# three tasks with unequal class counts and sizes: 9 (task, class) pairs, 125 images
TASKS = [make_task(0, 3, 40, 0), make_task(1, 1, 25, 40), make_task(2, 5, 60, 65)]


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("budget", [1, 4, 7, 50, 1000])  # 1, 4 and 7 are fewer than the 9 classes
def test_memory_stays_within_budget_and_holds_true_images(policy, budget):
    torch.manual_seed(0)
    memory = Memory(budget, policy)
    labels = torch.cat([task.train.y for task in TASKS])
    tasks = torch.cat([torch.full_like(task.train.y, task.index) for task in TASKS])
    held, seen, classes = set(), 0, []
    for task in TASKS:
        memory.add(task)
        seen += len(task.train)
        classes += [(task.index, c) for c in range(task.n_classes)]
        assert len(memory) == len(memory.x) == len(memory.t) == min(budget, seen)  # full whenever it can be
        ids = ids_of(memory.x)
        assert len(set(ids.tolist())) == len(ids)  # no image twice
        assert torch.equal(memory.y, labels[ids]) and torch.equal(memory.t, tasks[ids])  # images keep their labels
        new = set(ids_of(task.train.x).tolist())
        assert set(ids.tolist()) <= held | new  # earlier images come only from what was stored
        held = set(ids.tolist())
        if policy == "class_balanced":
            low, high = budget // len(classes), -(-budget // len(classes))
            for t, c in classes:
                count = int(((memory.t == t) & (memory.y == c)).sum())
                size = int(((tasks == t) & (labels == c)).sum())
                assert count <= high and (count >= low or count == size), (t, c, count)


def test_class_balanced_holds_equal_counts_per_class():
    torch.manual_seed(0)
    memory = Memory(20, "class_balanced")
    for task in TASKS:  # the smallest class has 12 images: every class can fill its share
        memory.add(task)
        pairs = torch.stack([memory.t, memory.y], 1).unique(dim=0, return_counts=True)[1]
        assert len(pairs) == sum(t.n_classes for t in TASKS[: task.index + 1])
        assert pairs.max() - pairs.min() <= 1 and pairs.sum() == 20


def test_reservoir_keeps_every_image_with_equal_probability():
    # 10 images in tasks of 2, 3 and 5, budget 3 (the second task both fills and replaces): each image
    # should be kept with p = 0.3. Seeded, 5000 trials: a frequency's standard deviation is
    # sqrt(p (1 - p) / 5000) = 0.0065 and the bound 0.03 is 4.6 of them. An off-by-one in the reservoir
    # count, or slots drawn from 0.9 x the count, move some image by 0.076 or 0.046 (simulated).
    tasks = [make_task(0, 2, 2, 0), make_task(1, 3, 3, 2), make_task(2, 1, 5, 5)]
    trials, kept = 5000, torch.zeros(10)
    torch.manual_seed(0)
    for _ in range(trials):
        memory = Memory(3, "reservoir")
        for task in tasks:
            memory.add(task)
        kept[ids_of(memory.x)] += 1
    assert ((kept / trials - 0.3).abs() < 0.03).all(), kept / trials


def make_er(*overrides):
    method, stream, _ = build_method(ER, *TINY, "method=er", *overrides)
    return method, stream, method.hw


@pytest.mark.parametrize("scenario, replay_loss", [("task", math.log(2)), ("class", math.log(6))])
def test_with_replay_weighs_current_by_one_over_t(scenario, replay_loss):
    # all-zero heads: every logit is 0, so the replayed cross-entropy is log(number of outputs it spans):
    # log 2 (each sample's own 2-class head) in the task scenario, log 6 (every class seen) in the class one
    method, stream, hw = make_er(f"stream.scenario={scenario}")
    model = method.model
    for task in stream.tasks:
        model.add_head(task.n_classes)
    for head in model.heads.heads:
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    memory = Memory(30, "class_balanced")

    def current(x, y):
        return torch.tensor(1.5)

    assert with_replay(current, memory, model, stream, hw, 0, 8) is current  # empty memory: no replay
    x, y = torch.randn(4, *stream.input_shape), torch.zeros(4, dtype=torch.long)
    for task in stream.tasks[:2]:
        memory.add(task)
        t = task.index + 2  # the task being learned is the t-th
        loss = with_replay(current, memory, model, stream, hw, t - 1, 8)(x, y)
        assert loss.item() == pytest.approx(1.5 / t + (1 - 1 / t) * replay_loss, rel=1e-6)


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_er_runs_in_every_scenario_and_stores_its_memory(tmp_path, scenario):
    overrides = [*TINY, f"stream.scenario={scenario}"]
    er, er_dir = run(tmp_path, *overrides, "method=er", "method.replay.budget=10", name="er")
    finetune, _ = run(tmp_path, *overrides, "method=finetune", name="finetune")
    R = matrix(er_dir)
    seen = np.tril(np.ones((3, 3), dtype=bool))
    assert np.isfinite(R[seen]).all() and ((R[seen] >= 0) & (R[seen] <= 1)).all()
    stored = 10 * (3 * 32 * 32 + 8 + 8)  # uint8 images, int64 labels and task indices
    assert er["params"] == finetune["params"]
    assert er["model_mb"] * 2**20 == pytest.approx(finetune["model_mb"] * 2**20 + stored)


@needs_shared("MNIST")
def test_er_beats_finetune_in_the_class_scenario_on_split_mnist(tmp_path):
    tiny = [*SPLIT_MNIST_CLASS, "backbone.width=0.25", "method.train.iterations=100"]
    er, _ = run(tmp_path, *tiny, "method=er", "method.replay.budget=200", name="er")
    finetune, _ = run(tmp_path, *tiny, "method=finetune", name="finetune")
    # seeds 0-2 gave ER 0.83-0.84, fine-tuning 0.19-0.20 (it keeps only the last task's two digits)
    assert finetune["acc"] < 0.3
    assert er["acc"] > finetune["acc"] + 0.3


def test_herding_picks_in_hand_computed_greedy_order():
    # rows normalised: x0 (1, 0), x1 (0, 1), x2 (.7071, .7071), x3 (.8, .6), x4 (0, -1); mean mu = (.50142, .26142).
    # Pick k maximises x . (k mu - S), S the sum of the earlier picks:
    #   k=1, target (.50142, .26142): x3 .55799 > x2 .53941 > x0 .50142 > x1 > x4  -> x3, S = (.8, .6)
    #   k=2, target (.20284, -.07716): x0 .20284 > x2 .08887 > x4 .07716 > x1     -> x0, S = (1.8, .6)
    #   k=3, target (-.29574, .18426): x1 .18426 > x2 -.07883 > x4 -.18426        -> x1, S = (1.8, 1.6)
    #   k=4, target (.20568, -.55432): x4 .55432 > x2 -.24652                      -> x4; then x2
    features = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [4.0, 3.0], [0.0, -1.0]])
    assert herding(features, 5).tolist() == [3, 0, 1, 4, 2]
    assert herding(features, 2).tolist() == [3, 0]
    assert herding(features, 9).tolist() == [3, 0, 1, 4, 2]  # at most every row, each once


def test_herding_memory_keeps_each_class_best_ranked_images_and_draws_no_random_numbers():
    table = torch.randn(125, 6, generator=torch.Generator().manual_seed(0))  # a feature row per image id

    def features(x: torch.Tensor) -> torch.Tensor:
        return table[ids_of(x)]

    memory = Memory(12, "herding")
    with pytest.raises(ValueError, match="features"):
        memory.add(TASKS[0])
    rng = torch.get_rng_state()
    ranked = {}  # (task, class) -> ids of its images in herding order
    for task in TASKS[:2]:
        for c in range(task.n_classes):
            index = torch.nonzero(task.train.y == c).squeeze(1)
            ranked[task.index, c] = ids_of(task.train.x[index[herding(features(task.train.x)[index], 100)]])
        memory.add(task, features)
        quota = 12 // len(ranked)  # 3 classes: 4 each; then 4 classes: 3 each
        for (t, c), ids in ranked.items():
            stored = ids_of(memory.x[(memory.t == t) & (memory.y == c)])
            assert torch.equal(stored, ids[:quota]), (t, c)  # best-ranked first; a shrinking class keeps its best
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("method", ["er", "ewc", "lwf"])
def test_herding_memory_holds_each_class_picks_on_the_backbone_features(method):
    budget = 24
    method, stream, _ = build_method(
        None, *TINY, f"method={method}", f"method.replay.budget={budget}", "method.replay.policy=herding"
    )
    for task in stream.tasks[:2]:
        method.learn(task)
        images = stream.prepare(task.train.x, train=False)  # as at test time
        features = method.model.eval().features(images)
        quota = budget // (2 * (task.index + 1))  # two classes per task
        for c in range(2):
            index = torch.nonzero(task.train.y == c).squeeze(1)
            picks = task.train.x[index[herding(features[index], quota)]]
            assert torch.equal(method.memory.x[(method.memory.t == task.index) & (method.memory.y == c)], picks)


# three MNIST tasks of unequal class counts and sizes (27, 40 and 15 training images), class scenario
UNEQUAL_MNIST = [
    "hardware=cpu",
    "hardware.threads=1",
    "stream=split_mnist",
    f"data.root={SHARED_DATA}",
    "stream.split=tasks",
    "stream.n_tasks=3",
    "stream.scenario=class",
    "backbone=mlp",
    "backbone.hidden=[32]",
    "stream.tasks=[{dataset:mnist,classes:[0,1,2],train_per_class:9,test_per_class:4},"
    "{dataset:mnist,classes:[3],train_per_class:40,test_per_class:4},"
    "{dataset:mnist,classes:[4,5,6,7,8],train_per_class:3,test_per_class:4}]",
]
REPLAY_METHODS = sorted(name for name, method_class in method_classes().items() if method_class.budget_key())
FASTER = {"rps_net": ["method.candidates=2"]}  # fewer random paths per task


@needs_shared("MNIST")
@pytest.mark.parametrize("name", REPLAY_METHODS)
def test_every_replay_method_holds_at_most_the_run_level_budget_and_counts_it(name):
    budget = 7
    overrides = [f"method={name}", f"replay.budget={budget}", "method.train.epochs=1", *FASTER.get(name, [])]
    method, stream, cfg = build_method(None, *UNEQUAL_MNIST, *overrides)
    assert OmegaConf.select(cfg.method, method.budget_key()) == budget  # the run-level key reached the method's
    for task in stream.tasks:
        method.learn(task)
        assert 0 < len(method.memory) <= budget
        stored = method.memory.add_to(Footprint(0, 0, 0)).bytes
        with_memory = method.footprint().bytes
        kept, method.memory = method.memory, copy.copy(method.memory)
        for part, value in vars(kept).items():  # images, labels, tasks, logits, weights: every stored tensor
            if isinstance(value, torch.Tensor):
                setattr(method.memory, part, None)
        assert with_memory - method.footprint().bytes == stored > 0  # every stored tensor counted, once
        method.memory = kept


def test_run_level_budget_names_the_same_run_as_the_methods_own_key_and_is_refused_without_a_memory():
    er = ["method=er", *TINY_STREAM]
    assert run_name(compose_config(*er, "replay.budget=30")) == run_name(compose_config(*er, "method.replay.budget=30"))
    assert run_name(compose_config(*er, "replay.budget=30")) != run_name(compose_config(*er))
    rps = ["method=rps_net", *TINY_STREAM]
    assert run_name(compose_config(*rps, "replay.budget=30")) == run_name(compose_config(*rps, "method.memory=30"))
    with pytest.raises(ClrunError, match=r"^replay.budget=30: method finetune keeps no replay memory"):
        build_method(None, "method=finetune", *TINY_STREAM, "replay.budget=30")


def test_a_sweep_over_replay_methods_and_budgets_from_the_command_line(tmp_path, capsys):
    tiny = ["stream.n_tasks=2", "stream.train_per_task=32", "stream.test_per_task=16", "method.train.epochs=1"]
    done = clrun(tmp_path, "-m", "method=er,agem", "replay.budget=5,9", *TINY_STREAM[:2], *tiny)
    assert done.returncode == 0, done.stderr
    summaries = pd.concat(pd.read_parquet(p) for p in tmp_path.glob("outputs/runs/*/summary.parquet"))
    assert sorted(zip(summaries["method"], summaries["replay_budget"], strict=True)) == [
        ("agem", 5),
        ("agem", 9),
        ("er", 5),
        ("er", 9),
    ]
    report.main([str(tmp_path / "outputs" / "runs")])
    assert "er memory 5" in " ".join(capsys.readouterr().out.split())
