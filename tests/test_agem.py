"""A-GEM: the closed-form projection by hand, the step applying it, one reference gradient per step on a memory
sample of earlier tasks, the class-balanced per-task memory, the preset, the CLI."""

import pandas as pd
import pytest
import torch
from conftest import TINY_STREAM, build_method, clrun, compose_config, run

import clrun.methods.agem as agem_module
from clrun.methods.agem import AGEM
from clrun.methods.parts.gradient_projection import agem_project

TINY = [*TINY_STREAM, "method=agem", "backbone=mlp", "backbone.hidden=[16,12]", "method.replay.budget=30"]
TINY += ["method.train.batch_size=8", "method.reference_batch=16"]


def test_projection_by_hand():
    g, g_ref = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g.g_ref = -1, g_ref.g_ref = 2: g - (-1 / 2) g_ref = (0.5, 0.5), orthogonal to g_ref
    torch.testing.assert_close(agem_project(g, g_ref), torch.tensor([0.5, 0.5]))
    assert agem_project(g, g_ref) @ g_ref == 0
    g = torch.tensor([3.0, -1.0, 2.0])
    g_ref = torch.tensor([-1.0, 0.0, 1.0])  # g.g_ref = -1, |g_ref|^2 = 2
    torch.testing.assert_close(agem_project(g, g_ref), torch.tensor([2.5, -1.0, 2.5]))
    tiny = torch.full((1000,), 1e-23)  # its float32 square underflows to 0
    out = agem_project(-tiny, tiny)
    assert torch.isfinite(out).all() and abs(float(out.double() @ tiny.double())) < 1e-60
    for unchanged in (torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])):  # dot > 0, dot = 0
        assert agem_project(unchanged, g_ref) is unchanged


def test_each_step_projects_against_one_reference_gradient_of_earlier_memories(monkeypatch):
    method, stream, _ = build_method(AGEM, *TINY, "stream.scenario=domain")
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    steps = []
    flat_grad, flat_gradient, batch = agem_module.flat_grad, agem_module.flat_gradient, method.memory.batch
    drawn = []

    def recording_batch(index, stream, hw):
        drawn.append(index)
        return batch(index, stream, hw)

    def recording_reference(loss, params):
        steps.append({"theta": torch.cat([p.detach().reshape(-1) for p in params])})
        steps[-1]["ref"] = flat_gradient(loss, params)
        return steps[-1]["ref"]

    def recording_grad(params):
        steps[-1]["g"] = flat_grad(params)
        return steps[-1]["g"]

    monkeypatch.setattr(method.memory, "batch", recording_batch)
    monkeypatch.setattr(agem_module, "flat_gradient", recording_reference)
    monkeypatch.setattr(agem_module, "flat_grad", recording_grad)
    row = method.learn(stream.tasks[2])
    assert len(steps) == 8 and len(drawn) == 8  # one reference batch and gradient per step
    for index in drawn:  # 16 distinct images of the earlier tasks' 20 in memory
        assert len(index.unique()) == 16 and set(method.memory.t[index].tolist()) <= {0, 1}
    assert len(method.memory) == 30 and method.memory.t.tolist().count(2) == 10
    conflicts = [s for s in steps if s["g"].double() @ s["ref"].double() < 0]
    assert row["projected_steps"] == len(conflicts) > 0
    lr = method.cfg.train.lr
    for step, following in zip(steps[:-1], steps[1:], strict=True):  # plain SGD on g or its projection
        applied = agem_project(step["g"], step["ref"])
        torch.testing.assert_close(following["theta"] - step["theta"], -lr * applied, rtol=1e-4, atol=1e-6)


def test_memory_is_class_balanced_per_task_and_within_budget():
    method, stream, _ = build_method(AGEM, *TINY, "method.replay.budget=31")  # 10 slots per task, 5 per class
    for task in stream.tasks:
        method.learn(task)
        assert len(method.memory) <= 31
    for k in range(3):
        index = method.memory.task_images(k)
        assert torch.bincount(method.memory.y[index]).tolist() == [5, 5]


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_learns_in_the_task_and_class_scenarios(tmp_path, scenario):
    summary, run_dir = run(tmp_path, *TINY, f"stream.scenario={scenario}")
    rows = pd.read_parquet(run_dir / "tasks.parquet")
    assert rows["projected_steps"].iloc[0] == 0 and rows["projected_steps"].iloc[1:].sum() > 0
    assert summary["acc"] > 0.5 if scenario == "task" else summary["acc"] > 1 / 6


def test_preset_is_the_agem_recipe():
    cfg = compose_config("experiment=agem_permuted_mnist")
    assert (cfg.stream.n_tasks, cfg.stream.train_per_task, cfg.stream.scenario.value) == (17, None, "domain")
    assert cfg.method.replay.budget // cfg.stream.n_tasks == 250 and cfg.method.replay.policy.value == "per_task_class"
    assert list(cfg.backbone.hidden) == [256, 256] and cfg.method.reference_batch == 256
    train = cfg.method.train
    assert (train.optimizer.value, train.lr, train.momentum, train.epochs, train.batch_size) == ("sgd", 0.1, 0, 1, 10)


def test_clrun_runs_agem_as_a_user_would(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=domain")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "outputs" / "runs").glob("agem-*/summary.parquet"))) == 1
