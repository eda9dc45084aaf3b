"""GEM: the dual QP solver against brute force, the projection's constraints and optimality, the step applying it,
one memory gradient per earlier task, the per-task memory within budget, footprint, resume, the preset, the CLI."""

import itertools
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import TINY_STREAM, assert_resume_is_bit_identical, build_method, clrun, compose_config, run

import clrun.methods.gem as gem_module
from clrun.methods.base import SharedModelMethod
from clrun.methods.gem import GEM
from clrun.methods.parts.gradient_projection import gem_project, solve_box_qp
from clrun.methods.parts.replay import Memory

TINY = [*TINY_STREAM, "method=gem", "backbone=mlp", "backbone.hidden=[16,12]", "method.replay.budget=30"]
TINY += ["method.train.batch_size=8"]


def brute_force_box_qp(P, q, lower):
    """min 1/2 v'Pv + q'v, v >= lower: every choice of the coordinates left free, the others at the bound."""
    n, best, best_value = len(q), None, float("inf")
    for k in range(n + 1):
        for free in itertools.combinations(range(n), k):
            v = torch.full((n,), lower, dtype=torch.float64)
            if free:
                f, b = list(free), [i for i in range(n) if i not in free]
                v[f] = torch.linalg.solve(P[f][:, f], -(q[f] + P[f][:, b] @ v[b]))
            if (v >= lower - 1e-12).all():
                value = float(0.5 * v @ P @ v + q @ v)
                if value < best_value:
                    best, best_value = v, value
    return best


def brute_force_projection(g, G):
    """The closest z to g with G z >= 0: over every subset of the constraints held as equalities."""
    best, best_distance = None, float("inf")
    for k in range(len(G) + 1):
        for active in itertools.combinations(range(len(G)), k):
            A = G[list(active)]
            z = g - A.T @ torch.linalg.solve(A @ A.T, A @ g) if k else g.clone()
            if (G @ z >= -1e-9).all() and (z - g).norm() < best_distance:
                best, best_distance = z, float((z - g).norm())
    return best


@pytest.mark.parametrize("lower", [0.0, 0.5])
def test_box_qp_solver_matches_brute_force(lower):
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = 1 + trial % 5
        A = torch.randn(n, n + 3, dtype=torch.float64, generator=generator)
        P = A @ A.T + 1e-3 * torch.eye(n, dtype=torch.float64)
        q = torch.randn(n, dtype=torch.float64, generator=generator) * 3
        v = solve_box_qp(P, q, lower)
        torch.testing.assert_close(v, brute_force_box_qp(P, q, lower), rtol=1e-8, atol=1e-8)
        assert (v >= lower).all()


def test_projection_satisfies_every_constraint_and_is_the_closest_such_vector():
    generator = torch.Generator().manual_seed(1)
    violated = 0
    for trial in range(60):
        t, p = 1 + trial % 5, 12
        G = torch.randn(t, p, dtype=torch.float64, generator=generator)
        g = torch.randn(p, dtype=torch.float64, generator=generator)
        if not (G @ g < 0).any():
            continue
        violated += 1
        projected = gem_project(g, G, margin=0.0, eps=0.0)
        assert (G @ projected >= -1e-9).all()
        torch.testing.assert_close(projected, brute_force_projection(g, G), rtol=1e-7, atol=1e-7)
        biased = gem_project(g, G, margin=0.5, eps=0.0)  # the code's margin keeps the constraints too
        assert (G @ biased >= -1e-9).all()
    assert violated > 20


def test_projection_with_the_codes_ridge_is_close_to_the_exact_one():
    generator = torch.Generator().manual_seed(2)
    G = torch.randn(4, 50, generator=generator)
    g = -G.sum(0)  # conflicts with every memory
    exact, ridged = gem_project(g, G, 0.0, 0.0), gem_project(g, G, 0.0, 1e-3)
    assert ridged.dtype == torch.float32 and (G @ exact > -1e-4).all()
    torch.testing.assert_close(ridged, exact, rtol=1e-2, atol=1e-2)


def test_each_step_applies_the_projection_of_its_gradient_against_every_earlier_tasks_memory(monkeypatch):
    method, stream, _ = build_method(GEM, *TINY, "stream.scenario=domain", "method.memory_strength=0", "method.eps=0")
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    steps = []  # per step after task 0: the parameters, the gradient, the memory gradients, the projection if any
    flat_grad, project = gem_module.flat_grad, gem_module.gem_project

    def recording_grad(params):
        g = flat_grad(params)
        steps.append({"theta": torch.cat([p.detach().reshape(-1) for p in params]), "g": g, "applied": g})
        return g

    def recording_projection(g, G, margin, eps):
        out = project(g, G, margin, eps)
        steps[-1].update(G=G, applied=out)
        return out

    monkeypatch.setattr(gem_module, "flat_grad", recording_grad)
    monkeypatch.setattr(gem_module, "gem_project", recording_projection)
    row = method.learn(stream.tasks[2])
    projected = [s for s in steps if "G" in s]
    assert row["projected_steps"] == len(projected) > 0 and len(steps) == 8
    for step in projected:
        G, g, out = step["G"], step["g"], step["applied"]
        assert G.shape == (2, len(g))  # one gradient per earlier task, on its whole memory
        assert (G @ g < 0).any() and not torch.allclose(out, g)
        assert (G @ out >= -1e-4 * G.norm(dim=1) * out.norm()).all()  # no earlier memory loss rises (1st order)
    lr = method.cfg.train.lr
    for step, following in zip(steps[:-1], steps[1:], strict=True):  # plain SGD on the projected gradient
        torch.testing.assert_close(following["theta"] - step["theta"], -lr * step["applied"], rtol=1e-4, atol=1e-6)


def task(index, n, classes):
    x = torch.randint(0, 255, (n, 1, 4, 4), dtype=torch.uint8)
    return SimpleNamespace(index=index, train=SimpleNamespace(x=x, y=torch.arange(n) % classes))


@pytest.mark.parametrize("policy", ["per_task", "per_task_class"])
def test_per_task_memory_keeps_each_tasks_share_within_the_budget(policy):
    memory = Memory(50, policy, n_tasks=4)  # 12 slots per task
    for index, n in enumerate([100, 7, 40, 13]):  # unequal tasks, one smaller than its share
        memory.add(task(index, n, classes=3))
        assert len(memory) <= 50
    counts = [len(memory.task_images(k)) for k in range(4)]
    assert counts == [12, 7, 12, 12]  # a task smaller than its share keeps all its images
    if policy == "per_task_class":
        assert torch.bincount(memory.y[memory.task_images(0)]).tolist() == [4, 4, 4]


def test_memory_is_counted_in_the_footprint_and_resume_is_bit_identical(tmp_path):
    method, stream, _ = build_method(GEM, *TINY)
    method.learn(stream.tasks[0])
    model_only = SharedModelMethod.footprint(method).bytes
    assert len(method.memory) == 10 and method.footprint().bytes >= model_only + method.memory.x.numel()
    assert_resume_is_bit_identical(tmp_path, *TINY, "stream.n_tasks=6", "backbone.hidden=[16,12,8]")


def test_preset_is_the_papers_protocol():
    cfg = compose_config("experiment=gem_permuted_mnist")
    assert (cfg.stream.n_tasks, cfg.stream.train_per_task, cfg.stream.scenario.value) == (20, 1000, "domain")
    assert cfg.method.replay.budget // cfg.stream.n_tasks == 256 and list(cfg.backbone.hidden) == [100, 100]
    train = cfg.method.train
    assert (train.optimizer.value, train.lr, train.momentum, train.epochs, train.batch_size) == ("sgd", 0.1, 0, 1, 10)
    assert cfg.method.memory_strength == 0.5


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_learns_in_the_task_and_class_scenarios(tmp_path, scenario):
    summary, run_dir = run(tmp_path, *TINY, f"stream.scenario={scenario}")
    rows = pd.read_parquet(run_dir / "tasks.parquet")
    assert rows["projected_steps"].iloc[0] == 0 and rows["projected_steps"].iloc[1:].gt(0).all()
    assert summary["acc"] > 0.5 if scenario == "task" else summary["acc"] > 1 / 6


def test_clrun_runs_gem_as_a_user_would(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=domain")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "outputs" / "runs").glob("gem-*/summary.parquet"))) == 1
