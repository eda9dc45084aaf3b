"""GCR (`gcr`): the gradient-matching selection, the weighted coreset within the budget over unequal tasks, the
logits stored at insertion, the weighted loss, learning in the class and task scenarios, resume, and a run through
the `clrun` command."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SPLIT_MNIST_CLASS,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    matrix,
    needs_shared,
    record_insertions,
    run,
)

from clrun.data.stream import Split, Task
from clrun.methods.parts.coreset import candidate_gradients, gradient_match, select_coreset
from clrun.results import module_bytes
from clrun.train import FitStats, Step

TINY = [*TINY_STREAM, "backbone=mlp", "backbone.width=0.1", "method.train.batch_size=16", "method=gcr"]


def test_gradient_match_recovers_a_non_negative_combination_exactly():
    torch.manual_seed(0)
    grads = torch.randn(30, 12)
    target = 2.0 * grads[4] + 0.5 * grads[17] + 1.5 * grads[22]
    index, w = gradient_match(grads, target, 5, lam=0.0)
    assert len(index) <= 5 and (w > 0).all()
    full = torch.zeros(30).index_put_((index,), w)
    torch.testing.assert_close(full[[4, 17, 22]], torch.tensor([2.0, 0.5, 1.5]), rtol=1e-4, atol=1e-4)
    assert full.sum() - full[[4, 17, 22]].sum() < 1e-4  # the other picks (the residual's rounding) weigh nothing


def test_selection_matches_the_pools_gradient_better_than_uniform_random_subsets():
    # a linear layer's real per-example gradients (CE + MSE to stored logits) on 120 examples of 3 classes
    torch.manual_seed(0)
    features = torch.randn(120, 8) + torch.arange(120)[:, None] % 3
    labels = torch.arange(120) % 3
    layer = torch.nn.Linear(8, 3)
    outputs = layer(features).detach().requires_grad_(True)
    grads = candidate_gradients(outputs, features, labels, torch.randn(120, 3), torch.ones(120), 0.1, 0.5)
    target = grads.sum(0)
    for n in (6, 15, 30):
        index, w = select_coreset(grads, labels, n, lam=0.5)
        assert len(index) <= n and len(set(index.tolist())) == len(index) and (w >= 0).all()
        error = (target - (w[:, None] * grads[index]).sum(0)).norm()
        randoms = []
        for _ in range(50):  # a uniform subset of the same size, each row weighted N / n (an unbiased estimate)
            subset = torch.randperm(120)[:n]
            randoms.append((target - grads[subset].sum(0) * 120 / n).norm())
        randoms = torch.stack(randoms)
        assert error < randoms.min() and error < 0.5 * randoms.median(), (n, error, randoms.median())


def unequal(stream, sizes):
    """The stream's tasks with `sizes` training images each (random pixels, labels alternating)."""
    tasks = []
    for task, n in zip(stream.tasks, sizes, strict=True):
        generator = torch.Generator().manual_seed(task.index)
        x = torch.randint(0, 256, (n, *stream.input_shape), dtype=torch.uint8, generator=generator)
        split = Split(x, torch.arange(n) % len(task.classes))
        tasks.append(Task(task.index, task.name, task.classes, split, task.test))
    stream.tasks[:] = tasks


@pytest.mark.parametrize("budget", [3, 7, 40])  # 3: a coreset of 1 row, earlier tasks' shares 0 from task 1 on
def test_memory_never_exceeds_the_budget_over_unequal_tasks_and_is_counted(budget):
    method, stream, _ = build_method(None, *TINY, f"method.replay.budget={budget}", "method.replay.batch_size=8")
    unequal(stream, [50, 9, 70])
    pool, coreset = method.pool, method.memory
    assert pool.budget + coreset.budget == budget
    largest = [0]
    insert = pool.insert

    def spy(*args):
        insert(*args)
        largest[0] = max(largest[0], len(pool) + len(coreset))

    pool.insert = spy
    for k, task in enumerate(stream.tasks):
        before, largest[0] = len(coreset), 0
        method.learn(task)
        # during the task: the coreset as it was and the reservoir filling its share; never above the budget
        assert largest[0] == before + min(pool.budget, task.train.y.numel()) <= budget
        assert len(pool) == 0 and len(coreset) <= coreset.budget
        counts = [int((coreset.t == t).sum()) for t in range(k + 1)]
        share = coreset.budget // (k + 1)
        # each earlier task its share (fewer if it had fewer), the new one the rest of the coreset or all it offered
        assert counts[:k] == [min(share, c) for c in counts[:k]] and max(counts[:k], default=0) <= share
        assert counts[k] == min(coreset.budget - k * share, task.train.y.numel(), pool.budget)
        assert (coreset.w > 0).all() and len(coreset.w) == len(coreset) == sum(counts)
        width = coreset.logits.shape[1]
        stored = len(coreset) * (coreset.x[0].numel() + 8 + 8 + 4 * width + 4)  # + its float32 weight
        assert method.footprint().bytes == module_bytes(method.model) + stored


@pytest.mark.parametrize("budget", [1, 2])
def test_a_budget_too_small_for_both_parts_still_trains(budget):
    # 1: a coreset of 1 and no reservoir (nothing ever selected); 2: one row each
    method, stream, _ = build_method(None, *TINY, f"method.replay.budget={budget}")
    for task in stream.tasks:
        method.learn(task)
        assert len(method.memory) + len(method.pool) <= budget and len(method.memory) == (budget == 2)


@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_stored_logits_are_the_models_outputs_when_the_image_was_offered(scenario):
    method, stream, _ = build_method(None, *TINY, f"stream.scenario={scenario}", "method.replay.budget=40")
    at_insertion = record_insertions(method, stream, method.pool)  # image bytes -> outputs when offered
    for task in stream.tasks[:2]:
        method.learn(task)
    coreset = method.memory
    assert set(coreset.t.tolist()) == {0, 1} and coreset.logits.shape[1] == (6 if scenario == "class" else 2)
    for image, row in zip(coreset.x, coreset.logits, strict=True):
        assert torch.equal(row, at_insertion[image.numpy().tobytes()])
    with torch.no_grad():
        final = method.outputs(method.hw.to_input(stream.prepare(coreset.x, train=False)))
    assert not torch.allclose(coreset.logits, final)  # not recomputed later


def test_loss_weights_the_replayed_terms_by_the_coreset_weights():
    method, stream, _ = build_method(
        None, *TINY, "method.replay.budget=20", "method.alpha=0.7", "method.beta=0.3", "method.replay.batch_size=6"
    )
    method.learn(stream.tasks[0])
    method.memory.w = torch.linspace(0.1, 5.0, len(method.memory))  # distinct weights, so that they matter
    captured = {}
    method.fit = lambda task, module, params, loss, **keys: captured.setdefault("loss", loss) and FitStats(*[0] * 6)
    method.refresh = lambda: None  # the loss only: no selection after the stub's "training"
    method.learn(stream.tasks[1])
    del method.fit, method.refresh
    loss, task = captured["loss"], stream.tasks[1]
    images, y = task.train.x[:8], task.train.y[:8]
    x = method.hw.to_input(stream.prepare(images, train=True, task=1))
    method.pool.clear()  # the start of task 1: every replayed row from the coreset
    torch.manual_seed(3)
    value = loss(x, y, images, Step(0, 0, 0, 1, 0, 8))
    coreset = method.memory
    with torch.no_grad():
        expected = F.cross_entropy(method.outputs(x), y + 2)
        torch.manual_seed(3)
        terms = []
        for _ in range(2):
            torch.randperm(0)  # the reservoir's (empty) draw comes first
            index = torch.randperm(len(coreset))[:6]
            w = coreset.w[index]
            out = method.outputs(
                method.hw.to_input(stream.prepare(coreset.x[index], train=True, task=coreset.t[index]))
            )
            terms.append((out, index, w / w.sum()))
        out, index, w = terms[0]
        expected += 0.7 * (F.mse_loss(out, coreset.logits[index], reduction="none").mean(1) * w).sum()
        out, index, w = terms[1]
        expected += 0.3 * (F.cross_entropy(out, coreset.y[index] + 2 * coreset.t[index], reduction="none") * w).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.pool.seen == 8  # then the batch went to the reservoir


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_gcr_learns_and_keeps_earlier_tasks_better_than_finetune(tmp_path, scenario):
    overrides = [*TINY, f"stream.scenario={scenario}", "method.train.epochs=3"]
    gcr, gcr_dir = run(tmp_path, *overrides, "method.replay.budget=40", name="gcr")
    finetune, _ = run(tmp_path, *overrides, "method.replay.budget=0", name="finetune")  # no memory at all
    R = matrix(gcr_dir)
    assert np.isfinite(R[np.tril_indices(3)]).all()
    if scenario == "class":  # fine-tuning keeps only the last task's classes
        assert gcr["acc"] > finetune["acc"] + 0.05, (gcr["acc"], finetune["acc"])
    else:  # two classes a task (chance 0.5); fine-tuning forgets little here
        assert gcr["acc"] > 0.6 and gcr["acc"] > finetune["acc"] - 0.1, (gcr["acc"], finetune["acc"])


def test_gcr_resumes_bit_identically(tmp_path):
    # the coreset (images, logits, weights), the emptied reservoir, the counts and torch's RNG come back; five
    # hidden layers, so that the state holds more than the helper's 20 tensors (10 + 6 head + 5 coreset tensors)
    deep = "backbone.hidden=[100,100,100,100,100]"
    assert_resume_is_bit_identical(tmp_path, *TINY, deep, "stream.scenario=class", "method.replay.budget=20")


def test_clrun_runs_gcr_as_a_user_would(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=task", "method.replay.budget=30")
    assert done.returncode == 0, done.stderr[-2000:]
    (summary,) = (tmp_path / "outputs" / "runs").glob("gcr-*/summary.parquet")
    row = pd.read_parquet(summary).iloc[0]
    assert row["method"] == "gcr" and 0 <= row["acc"] <= 1 and math.isfinite(row["bwt"])


@needs_shared("MNIST")
def test_gcr_beats_finetune_in_the_class_scenario_on_split_mnist(tmp_path):
    tiny = [*SPLIT_MNIST_CLASS, "backbone.hidden=[100,100]", "method=gcr"]
    gcr, _ = run(tmp_path, *tiny, name="gcr")
    finetune, _ = run(tmp_path, *tiny, "method.replay.budget=0", name="finetune")
    assert finetune["acc"] < 0.3
    assert gcr["acc"] > finetune["acc"] + 0.3, (gcr["acc"], finetune["acc"])
