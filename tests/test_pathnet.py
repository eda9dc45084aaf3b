"""PathNet: the tournament keeps the fitter path, mutation's rate and bounds, frozen modules, resume, learning."""

import numpy as np
import pandas as pd
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

from clrun.methods.pathnet import SHIFT, PathNet, mutate, tournament

TINY = [
    *TINY_STREAM,
    "method=pathnet",
    "method.population=6",
    "method.max_generations=3",
    "method.modules=4",
    "method.active=2",
    "method.units=8",
    "method.train.iterations=4",
]


def test_tournament_keeps_the_fitter_path_and_overwrites_the_loser():
    torch.manual_seed(0)
    population = torch.randint(10, (8, 3, 3))
    start, scored = population.sum((1, 2)).float().mean(), []

    def fitness(path):  # hand-built: a larger index sum is fitter
        scored.append(path.clone())
        return float(path.sum())

    for _ in range(50):
        before = population.clone()
        scored.clear()
        winner, score = tournament(population, fitness, 10)
        first, second = scored
        fitter, other = (first, second) if first.sum() >= second.sum() else (second, first)
        assert torch.equal(winner, fitter) and score == fitness(fitter)
        changed = [i for i in range(8) if not torch.equal(population[i], before[i])]
        assert len(changed) <= 1  # only the loser's row
        for i in changed:  # now a mutated copy of the winner
            assert torch.equal(before[i], other)
            distance = (population[i] - winner) % 10
            assert torch.minimum(distance, 10 - distance).max() <= SHIFT
    assert population.sum((1, 2)).float().mean() > start  # selection spreads the fitter paths


def test_mutation_rate_and_bounds():
    torch.manual_seed(0)
    path = torch.randint(10, (3, 3))
    copies = torch.stack([mutate(path, 10) for _ in range(20000)])
    assert copies.min() >= 0 and copies.max() < 10
    shift = (copies - path + 5) % 10 - 5  # the shift, unwrapped
    assert shift.abs().max() == SHIFT
    changed = (shift != 0).float().mean().item()
    expected = (
        1 / 9 * 4 / 5
    )  # each index hit with probability 1 / (N L); a hit shifts by a nonzero amount 4/5 of the time
    assert abs(changed - expected) < 0.005
    hits = shift[shift != 0]
    assert {int(v) for v in hits.unique()} == {-2, -1, 1, 2}
    assert torch.equal(path, copies[0] - shift[0])  # `mutate` copies: the path itself is never modified


def test_frozen_modules_and_earlier_logits_stay_bit_identical():
    method, stream, _ = build_method(PathNet, *TINY, "backbone=mlp")
    net, logits, frozen = method.net, [], []
    for task in stream.tasks:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        row = method.learn(task)
        assert 1 <= row["generations"] <= 3
        path = method.paths[task.index]
        assert net.frozen[torch.arange(3)[:, None], path].all()
        for i, m in frozen:  # modules frozen by earlier tasks: bit-identical
            for name, value in net.layers[i][m].state_dict().items():
                assert torch.equal(value, before[f"layers.{i}.{m}.{name}"])
        for j in range(task.index):
            assert torch.equal(method.predict(task_inputs(stream, j), j), logits[j])
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        newly = {(i, m) for i in range(3) for m in range(4) if net.frozen[i, m]} - set(frozen)
        frozen += sorted(newly)
        assert all((i, m) in frozen for i in range(3) for m in path[i].tolist())
    assert net.frozen.sum() == len(frozen)


def test_frozen_modules_are_not_trained_and_free_ones_reinitialised():
    method, stream, _ = build_method(PathNet, *TINY)
    method.learn(stream.tasks[0])
    net = method.net
    path = torch.tensor([[0, 1], [0, 0], [2, 3]])
    assert not net.frozen.all()
    trainable = {id(p) for p in net.trainable(path)}
    for i, layer in enumerate(net.layers):
        for m, module in enumerate(layer):
            on_path = m in path[i].tolist() and not net.frozen[i, m]
            assert all((id(p) in trainable) == on_path for p in module.parameters())
    weights = {(i, m): net.layers[i][m].weight.clone() for i in range(3) for m in range(4)}
    was_frozen = net.frozen.clone()
    net.freeze(torch.zeros(3, 2, dtype=torch.long))  # module 0 of each layer joins the frozen ones
    for (i, m), weight in weights.items():
        assert torch.equal(net.layers[i][m].weight, weight) == (bool(was_frozen[i, m]) or m == 0)


def test_resume_after_task_2_equals_uninterrupted(tmp_path):
    _, straight = run(tmp_path, *TINY, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *TINY, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    R = matrix(straight)
    assert all((R[j:, j] == R[j, j]).all() for j in range(3))


@needs_shared("MNIST", "raw")
def test_learns_real_split_mnist_and_counts_generations(tmp_path):
    summary, run_dir = run(
        tmp_path,
        "hardware=cpu",
        "hardware.threads=1",
        "method=pathnet",
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=1000",
        "stream.test_per_task=400",
        "method.max_generations=20",
        "method.threshold=0.98",
    )
    R = matrix(run_dir)
    assert np.diag(R).min() > 0.9  # chance: 0.5
    assert summary["bwt"] == 0.0
    tasks = pd.read_parquet(run_dir / "tasks.parquet")
    assert tasks["generations"].between(1, 20).all()
    reached = tasks["generations"] < 20
    assert (tasks.loc[reached, "fitness"] >= 0.98).all()
