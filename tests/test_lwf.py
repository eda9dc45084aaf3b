"""LwF: the distillation loss, the frozen teacher, the warm-up, learning on real MNIST, resume with replay."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, TINY_STREAM, build_method, matrix, needs_shared, run, run_interrupted_then_resumed

from clrun.methods.lwf import KDForm, LwF, distillation
from clrun.results import module_bytes

TINY = [
    *TINY_STREAM,
    "method=lwf",
    "backbone=mlp",
    "backbone.width=0.1",
    "method.train.iterations=4",
    "method.train.batch_size=16",
]


def make_lwf(*overrides):
    return build_method(LwF, *TINY, *overrides)[:2]


def test_distillation_matches_a_hand_computed_case():
    # teacher [2, 0, 0] at T=2 -> targets softmax([1, 0, 0]) = [e, 1, 1] / (e + 2)
    # student [0, 2, 0] at T=2 -> log softmax([0, 1, 0]) = [0, 1, 0] - log(e + 2)
    e = math.e
    expected = math.log(e + 2) - 1 / (e + 2)
    student, teacher = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    assert distillation(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # the batch mean, and no T^2 factor: identical logits give the teacher's entropy at T
    batch = torch.cat([student, teacher])
    assert distillation(batch, torch.cat([teacher, teacher]), 2.0).item() == pytest.approx(
        (expected + math.log(e + 2) - e / (e + 2)) / 2, rel=1e-6
    )


def test_van_de_vens_2019_form_is_t_squared_times_the_mean_over_batch_and_classes():
    e = math.e
    student, teacher = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    summed = math.log(e + 2) - 1 / (e + 2)  # the case above: one row, summed over its 3 classes
    assert distillation(student, teacher, 2.0, KDForm.vdv2019).item() == pytest.approx(4 * summed / 3, rel=1e-6)
    padded = torch.tensor([[2.0, 0.0, 0.0, -math.inf]])  # a new class: target 0, still counted in the mean
    wider = torch.tensor([[0.0, 2.0, 0.0, 5.0]])
    terms = -(torch.softmax(padded / 2, 1) * torch.log_softmax(wider / 2, 1))
    assert distillation(wider, padded, 2.0, KDForm.vdv2019).item() == pytest.approx(4 * terms.sum().item() / 4)


def test_kd_form_reaches_the_loss():
    losses = {}
    for form in ("summed", "vdv2019"):
        torch.manual_seed(0)
        method, stream = make_lwf(f"method.kd_form={form}")
        method.model.add_head(stream.tasks[0].n_classes)
        teacher = method.make_teacher()
        method.model.add_head(stream.tasks[1].n_classes)
        loss = method.lwf_loss(1, teacher)
        x = stream.prepare(stream.tasks[1].train.x[:8], train=False)
        losses[form] = loss(x, stream.tasks[1].train.y[:8], None).item()
    assert losses["summed"] != pytest.approx(losses["vdv2019"])


def soft_ce(student, teacher, temperature):
    p = torch.softmax(teacher / temperature, 1)
    return -(p * torch.log(torch.softmax(student / temperature, 1))).sum(1).mean()


@pytest.mark.parametrize("scenario", ["task", "class", "class_over_seen", "domain"])
def test_lwf_loss_per_scenario(scenario):
    over_seen = scenario == "class_over_seen"
    scenario = scenario.removesuffix("_over_seen")
    method, stream = make_lwf(
        f"stream.scenario={scenario}",
        "method.lwf_lambda=0.7",
        "method.temperature=3",
        f"method.kd_over_seen={over_seen}",
    )
    model = method.model
    for task in stream.tasks[:2]:
        model.add_head(task.n_classes)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.add_head(stream.tasks[2].n_classes)
    x, y = torch.randn(8, *stream.input_shape), torch.randint(0, 2, (8,))
    got = method.lwf_loss(2, teacher)(x, y, None)
    if scenario == "task":  # one KD per earlier head, each with its own softmax, summed
        ce = F.cross_entropy(model(x, 2), y)
        kd = sum(soft_ce(model(x, j), teacher(x, j), 3.0) for j in range(2))
    elif over_seen:  # the student's softmax over all 6 seen classes, the teacher's over the 4 old ones
        ce = F.cross_entropy(model(x, None), y + 4)
        p = torch.softmax(teacher(x, None) / 3.0, 1)
        kd = -(p * torch.log_softmax(model(x, None) / 3.0, 1)[:, :4]).sum(1).mean()
    elif scenario == "class":  # CE over all 6 seen classes; KD over the 4 classes of tasks 0 and 1
        ce = F.cross_entropy(model(x, None), y + 4)
        kd = soft_ce(model(x, None)[:, :4], teacher(x, None), 3.0)
    else:
        ce = F.cross_entropy(model(x, None), y)
        kd = soft_ce(model(x, None), teacher(x, None), 3.0)
    assert got.item() == pytest.approx((ce + 0.7 * kd).item(), rel=1e-5)
    assert method.lwf_loss(2, None)(x, y, None).item() == pytest.approx(ce.item(), rel=1e-5)
    method.cfg.weight_by_tasks = True  # van de Ven 2019: third task, (1/3) CE + (2/3) lambda KD
    assert method.lwf_loss(2, teacher)(x, y, None).item() == pytest.approx((ce / 3 + 2 / 3 * 0.7 * kd).item(), rel=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_warmup_trains_the_new_head_only(monkeypatch):
    # convnet: batch norm, whose running statistics move if the teacher ran in train mode
    method, stream = make_lwf("backbone=convnet", "backbone.width=0.25", "method.warmup_epochs=1")
    method.learn(stream.tasks[0])
    before = copy.deepcopy(method.model.state_dict())
    teachers, phases = [], []
    make_teacher, fit = LwF.make_teacher, method.trainer.fit

    def capture_teacher(self):
        teachers.append(make_teacher(self))
        return teachers[-1]

    def fit_and_snapshot(*args, **kwargs):
        start = copy.deepcopy(method.model.state_dict())
        stats = fit(*args, **kwargs)
        phases.append((start, copy.deepcopy(method.model.state_dict())))
        return stats

    monkeypatch.setattr(LwF, "make_teacher", capture_teacher)
    monkeypatch.setattr(method.trainer, "fit", fit_and_snapshot)
    method.learn(stream.tasks[1])

    (teacher,) = teachers
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.state_dict().keys() == before.keys()
    for key, value in teacher.state_dict().items():  # weights and batch-norm statistics as before the task
        assert torch.equal(value, before[key]), key
    (warmup_start, warmup_end), (_, joint) = phases
    for key, value in warmup_end.items():  # warm-up: only the new head moves; batch-norm statistics stay
        assert torch.equal(value, warmup_start[key]) == (not key.startswith("heads.heads.1.")), key
    # then everything trains, the old head too (what LwF distils into), in train mode
    for key in ("heads.heads.0.weight", "backbone.layers.0.weight", "backbone.layers.1.running_mean"):
        assert not torch.equal(joint[key], before[key]), key


@needs_shared("MNIST")
def test_lwf_learns_and_forgets_less_than_finetune_on_split_mnist(tmp_path):
    tiny = [
        "hardware=cpu",
        "hardware.threads=1",
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "backbone=mlp",
        "backbone.width=0.25",
        "stream.train_per_task=500",
        "stream.test_per_task=200",
        "method.train.iterations=100",
        "method.train.lr=0.005",  # a high rate: fine-tuning forgets clearly within 100 steps a task
    ]
    lwf, _ = run(tmp_path, *tiny, "method=lwf", name="lwf")
    finetune, _ = run(tmp_path, *tiny, "method=finetune", name="finetune")
    # seeds 0-2 gave acc 0.98-0.99 vs 0.92-0.97 and forgetting 0.004-0.005 vs 0.02-0.09
    assert lwf["acc"] > 0.9 and lwf["acc"] > finetune["acc"]  # chance: 0.5
    assert lwf["forgetting"] < finetune["forgetting"] / 2


def test_resume_with_replay_equals_the_uninterrupted_run(tmp_path):
    overrides = [*TINY, "stream.scenario=class", "method.replay.budget=20", "method.replay.policy=reservoir"]
    summary, uninterrupted = run(tmp_path, *overrides)
    resumed = run_interrupted_then_resumed(tmp_path, *overrides)
    np.testing.assert_array_equal(matrix(resumed), matrix(uninterrupted))
    method, stream = make_lwf(*overrides[len(TINY) :])
    for task in stream.tasks:
        method.learn(task)
    assert len(method.memory) == 20
    memory_bytes = sum(v.numel() * v.element_size() for v in (method.memory.x, method.memory.y, method.memory.t))
    assert method.footprint().bytes == module_bytes(method.model) + memory_bytes
    assert summary["model_mb"] == pytest.approx(method.footprint().bytes / 2**20)


def test_one_optimizer_carries_adams_state_across_tasks():
    for one in (False, True):
        method, stream = make_lwf(f"method.one_optimizer={one}")
        for task in stream.tasks[:2]:
            method.learn(task)
        carried = method.carry.get(next(method.model.backbone.parameters()))
        assert (int(carried["step"]) if one else carried) == (8 if one else None)  # 4 iterations a task, one Adam


def test_resume_with_one_optimizer_equals_the_uninterrupted_run(tmp_path):
    overrides = [*TINY, "method.one_optimizer=true"]
    _, uninterrupted = run(tmp_path, *overrides)
    resumed = run_interrupted_then_resumed(tmp_path, *overrides)
    np.testing.assert_array_equal(matrix(resumed), matrix(uninterrupted))
    losses = [pd.read_parquet(folder / "tasks.parquet")["train_loss"].tolist() for folder in (resumed, uninterrupted)]
    assert losses[0] == losses[1]  # task 3 went on with the carried Adam state
