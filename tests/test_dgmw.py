"""DGMw: earlier classes' generated images bit-identical under later tasks, binary masks and growth that keeps the
free weights, the class scenario only, resume, the CLI, and beating finetune's class-IL accuracy on split MNIST."""

import pandas as pd
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    needs_shared,
    one_line_error,
)

from clrun.methods.dgmw import DGMw

CLASS = ["stream.scenario=class"]
TINY = [*TINY_STREAM, *CLASS, "method=dgmw", "backbone=mlp", "backbone.width=0.25", "method.train.epochs=2"]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


def fixed_samples(method: DGMw, task: int) -> torch.Tensor:
    """Generated images of task `task`'s classes from noise fixed by a seed of its own."""
    offset, n = method.stream.class_offset(task), method.stream.tasks[task].n_classes
    labels = torch.arange(offset, offset + n).repeat(8)
    z = torch.randn(len(labels), method.cfg.nz, generator=torch.Generator().manual_seed(task))
    z[:, : method.classes] = torch.nn.functional.one_hot(labels, method.classes).float()
    return method.generate(task, labels, z)


def test_earlier_classes_generate_bit_identical_images_while_the_generator_grows():
    method, stream, _ = make()
    samples, free = [], []
    for task in stream.tasks:
        shapes = [w.shape for w in method.generator.weights]
        row = method.learn(task)
        for j, before in enumerate(samples):
            assert torch.equal(fixed_samples(method, j), before), f"task {j}'s images after task {task.index}"
        samples.append(fixed_samples(method, task.index))
        assert all(m.dtype == torch.bool for m in method.masks[-1])
        assert row["reserved_new"] > 0 and row["channels_added"] > 0
        assert [w.shape for w in method.generator.weights] != shapes  # grown
        free.append(sum(int((~r).sum()) for r in method.reserved))
    assert free[0] == free[-1] or abs(free[-1] - free[0]) / free[0] < 0.25  # free capacity about constant
    assert not torch.equal(samples[0][: len(samples[1])], samples[1])  # the classes differ


def test_reserved_weights_would_move_without_their_gradient_mask(monkeypatch):
    """The bit-identity above is the gradient mask's doing: with it off, a reserved weight moves."""
    method, stream, _ = make()
    method.learn(stream.tasks[0])
    reserved = [r.clone() for r in method.reserved]
    before = [w.detach().clone() for w in method.generator.weights]
    monkeypatch.setattr(method, "reserved", [torch.zeros_like(r) for r in method.reserved])
    method.learn(stream.tasks[1])
    moved = [
        not torch.equal(w.detach()[: b.shape[0], : b.shape[1]][r], b[r])
        for w, b, r in zip(method.generator.weights, before, reserved, strict=True)
    ]
    assert any(moved)


def test_class_scenario_only_and_nz_must_hold_the_one_hot():
    one_line_error("does not support stream.scenario=task; it supports class", make, "stream.scenario=task")
    one_line_error("does not support stream.scenario=domain", make, "stream.scenario=domain")
    one_line_error("method.nz=4 must exceed", make, "method.nz=4")


def test_resume_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "stream.train_per_task=32", "stream.test_per_task=16", "method.train.epochs=1"]
    assert_resume_is_bit_identical(tmp_path, *overrides)  # weights, masks, buffers


def test_cli_runs_dgmw(tmp_path):
    done = clrun(tmp_path, *TINY, "method.train.epochs=1", "method.reinit_discriminator=false")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    tasks = pd.read_parquet(run_dir / "tasks.parquet")
    assert (tasks["channels_added"] > 0).all()
    assert 0 < pd.read_parquet(run_dir / "summary.parquet")["free_weights"].item() < 1


@needs_shared("MNIST")
def test_beats_finetune_class_incremental_on_split_mnist():
    real = [
        *TINY_STREAM,
        *CLASS,
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.n_tasks=2",
        "stream.train_per_task=1000",
        "stream.test_per_task=200",
        "backbone=mlp",
        "backbone.width=0.25",
        "method.train.iterations=100",
    ]
    scores = {}
    for name in ("finetune", "dgmw"):
        method, stream, _ = build_method(None, *real, f"method={name}")
        for task in stream.tasks:
            method.learn(task)
        correct = total = 0
        for task in stream.tasks:
            x = stream.prepare(task.test.x, train=False)
            logits = method.predict_agnostic(x, len(stream.tasks))[0]
            correct += (logits.argmax(1) == stream.targets(task.test.y, task.index)).sum().item()
            total += len(task.test)
        scores[name] = correct / total
    assert scores["finetune"] < 0.6  # it forgets the first task's digits
    assert scores["dgmw"] > scores["finetune"] + 0.15, scores
