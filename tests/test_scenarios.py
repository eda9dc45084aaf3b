"""The task, class and domain scenarios: label and head layouts, the matrices each measures, task identification."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import build_method, compose_config, matrix, run, run_interrupted_then_resumed

from clrun import metrics, results
from clrun.data import build_stream
from clrun.errors import ClrunError
from clrun.methods.base import identify_task, task_loss
from clrun.methods.finetune import Finetune
from clrun.models import TaskModel
from clrun.models.backbones import build_backbone

TINY = [
    "hardware=cpu",
    "hardware.threads=1",
    "backbone=mlp",
    "backbone.hidden=[32]",
    "stream.train_per_task=200",
    "stream.test_per_task=60",
    "stream.n_tasks=3",
]


def accuracy_table(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / results.ACCURACY_FILE)


def tiny_model(scenario: str) -> TaskModel:
    cfg = compose_config(*TINY)
    return TaskModel(build_backbone(cfg.backbone, (1, 8, 8)), scenario)


def test_class_scenario_logits_are_the_heads_concatenated_and_domain_shares_one_head():
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    growing = tiny_model("class")
    assert [growing.add_head(n) for n in (2, 3)] == [0, 1]
    features = growing.features(x)
    joined = growing(x, None)
    assert joined.shape == (5, 5)
    assert torch.equal(joined[:, 2:], growing(x, 1)) and torch.equal(joined[:, :2], growing.heads(features, 0))
    assert len(growing.trainable(1)) == len(list(growing.parameters()))

    shared = tiny_model("domain")
    assert [shared.add_head(2) for _ in range(3)] == [0, 0, 0]
    assert len(shared.heads.heads) == 1 and torch.equal(shared(x, 2), shared(x, None))

    multi = tiny_model("task")
    multi.add_head(2), multi.add_head(2)
    assert {id(p) for p in multi.trainable(1)}.isdisjoint(id(p) for p in multi.heads.heads[0].parameters())
    with pytest.raises(ValueError, match="task scenario"):
        multi(x, None)


def test_class_scenario_targets_shift_by_the_classes_of_earlier_tasks():
    cfg = compose_config(*TINY, "stream.scenario=class")
    stream = build_stream(cfg.stream, cfg.data, 0, "cpu")
    stream.tasks[1].classes = [7, 8, 9]  # unequal class counts: offsets follow them
    assert [stream.class_offset(k) for k in range(3)] == [0, 2, 5]
    y, t = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 2])
    assert stream.targets(y, t).tolist() == [0, 3, 4, 5]
    assert stream.targets(y, 2).tolist() == [5, 6, 7, 5]


def test_class_scenario_records_task_agnostic_and_task_aware_matrices(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "stream.scenario=class")
    table = accuracy_table(run_dir)
    assert set(table["eval_mode"]) == {results.TASK_AGNOSTIC, results.TASK_AWARE}
    agnostic = results.accuracy_matrix(table, 3, results.TASK_AGNOSTIC)
    aware = results.accuracy_matrix(table, 3, results.TASK_AWARE)
    lower = np.tril_indices(3)
    # the right class winning over every class seen implies it wins over its task's classes
    assert (agnostic[lower] <= aware[lower]).all() and np.isnan(agnostic[np.triu_indices(3, 1)]).all()
    assert summary["acc"] == pytest.approx(metrics.acc(agnostic))
    assert summary["task_aware_acc"] == pytest.approx(metrics.acc(aware))
    assert summary["scenario"] == "class"
    # finetune in the class scenario predicts only the last task's classes: earlier tasks collapse
    assert agnostic[2, 0] < aware[2, 0]
    assert np.array_equal(matrix(run_dir), agnostic, equal_nan=True)  # the headline matrix


def test_domain_scenario_measures_the_whole_matrix_and_forward_transfer(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "stream.scenario=domain")
    table = accuracy_table(run_dir)
    assert set(table["eval_mode"]) == {results.TASK_AGNOSTIC}
    R = results.accuracy_matrix(table, 3)
    b = results.initial_accuracy(table, 3)
    assert not np.isnan(R).any() and not np.isnan(b).any()  # future tasks and the untrained model too
    assert summary["fwt"] == pytest.approx(np.mean([R[0, 1] - b[1], R[1, 2] - b[2]]))
    assert "task_aware_acc" not in summary


def test_scratch_with_entropy_task_id_runs_in_the_class_scenario_and_reports_task_identification(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "method=scratch", "method.task_id=entropy", "stream.scenario=class")
    table = accuracy_table(run_dir)
    agnostic = results.matrix_rows(table, results.TASK_AGNOSTIC)
    aware = results.matrix_rows(table, results.TASK_AWARE)
    assert agnostic["task_id_accuracy"].between(0, 1).all() and aware["task_id_accuracy"].isna().all()
    # a wrongly identified task always gives a wrong class
    assert (agnostic["accuracy"].to_numpy() <= agnostic["task_id_accuracy"].to_numpy() + 1e-12).all()
    assert (aware["accuracy"].to_numpy() >= agnostic["accuracy"].to_numpy() - 1e-12).all()
    final = agnostic[agnostic["train_task"] == 2]
    assert summary["task_id_acc"] == pytest.approx(final["task_id_accuracy"].mean())
    # with one task learned, identification is trivially right
    assert (agnostic[agnostic["train_task"] == 0]["task_id_accuracy"] == 1).all()


def test_identify_task_by_confidence_and_by_entropy():
    peaked = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    flat_but_high = torch.tensor([[3.0, 3.0, -9.0], [1.0, 0.0, 0.0]])
    # sample 0: task 0 is more confident and less uncertain; sample 1: task 1 is more confident
    assert identify_task([peaked, flat_but_high], "confidence").tolist() == [0, 1]
    assert identify_task([peaked, flat_but_high], "entropy").tolist() == [0, 1]
    # they disagree: c is more confident (0.6 vs 0.55), d spreads less (entropy 0.69 vs 0.95)
    c = torch.log(torch.tensor([[0.6, 0.2, 0.2]]))
    d = torch.log(torch.tensor([[0.55, 0.45 - 1e-6, 1e-6]]))
    assert identify_task([c, d], "confidence").item() == 0 and identify_task([c, d], "entropy").item() == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=scratch", "stream.scenario=class"], "method scratch does not support stream.scenario=class"),
        (["method=packnet", "stream.scenario=domain"], "it supports task; method.task_id=confidence|entropy"),
    ],
)
def test_unsupported_scenario_fails_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ClrunError, match=message):
        run(tmp_path, *TINY, *overrides)
    assert not (tmp_path / "run" / results.ACCURACY_FILE).exists()


def test_iterations_train_exactly_that_many_steps():
    method, stream, cfg = build_method(Finetune, *TINY, "method.train.iterations=7", "method.train.batch_size=64")
    head = method.model.add_head(2)
    calls = []

    def loss(x, y, step):
        calls.append((len(x), step.number, step.epoch, step.batch, step.offset))
        return F.cross_entropy(method.model(x, head), y)

    task = stream.tasks[0]
    stats = method.fit(task, method.model, method.model.trainable(head), loss)
    assert len(calls) == 7 and stats.epochs == 2  # 200 images, batches of 64: 4 per epoch
    # each step is handed where it is: its number, epoch, batch within the epoch and image offset
    assert [c[1:] for c in calls] == [(0, 0, 0, 0), (1, 0, 1, 64), (2, 0, 2, 128), (3, 0, 3, 192)] + [
        (4, 1, 0, 0),
        (5, 1, 1, 64),
        (6, 1, 2, 128),
    ]
    calls = [c[0] for c in calls]
    assert stats.images == sum(calls)


@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_interrupted_run_resumes_to_the_same_matrices(tmp_path, scenario):
    overrides = [*TINY, f"stream.scenario={scenario}"]
    _, whole = run(tmp_path, *overrides, name="whole")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    columns = ["train_task", "eval_task", "eval_mode", "accuracy"]
    pd.testing.assert_frame_equal(accuracy_table(whole)[columns], accuracy_table(resumed)[columns])


def test_cosine_schedule_spans_the_epochs_iterations_make():
    method, stream, cfg = build_method(
        Finetune, *TINY, "method.train.iterations=12", "method.train.batch_size=64", "method.train.schedule=cosine"
    )
    head = method.model.add_head(2)
    task = stream.tasks[0]
    rates = []
    method.fit(
        task,
        method.model,
        method.model.trainable(head),
        task_loss(method.model, 0, stream),
        after_backward=lambda step, optimizers: rates.append(optimizers[0].param_groups[0]["lr"]),
    )
    # 200 images in batches of 64: 4 steps per epoch, 3 epochs; cosine over those 3 (not train.epochs=2)
    lr = cfg.method.train.lr
    assert rates == pytest.approx([lr] * 4 + [lr * 0.75] * 4 + [lr * 0.25] * 4)
