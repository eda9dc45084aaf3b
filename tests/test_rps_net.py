"""RPS-Net: frozen earlier paths, the search keeps the best candidate, the controller, distillation, resume, the CLI,
class-incremental learning on MNIST."""

import numpy as np
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
    run_tables,
    snapshot,
    unchanged,
)

from clrun import results
from clrun.methods.rps_net import RPSNet, distillation, distillation_weight, random_path

SMALL = ["method=rps_net", "method.widths=[32,16]", "method.modules=4", "method.candidates=3", "method.memory=30"]
TINY = [*TINY_STREAM, *SMALL, "stream.scenario=class", "method.train.epochs=2"]


def test_earlier_paths_never_move_and_only_the_new_path_and_head_train():
    method, stream, _ = build_method(RPSNet, *TINY, "method.active=2")
    net = method.net
    modules = lambda mask: {(i, m) for i in range(2) for m in range(4) if mask[i, m]}  # noqa: E731
    for task in stream.tasks:
        before = [[snapshot(module) for module in layer] for layer in net.layers]
        head = snapshot(net.head)
        frozen = modules(method.fixed | method.path)  # the finished path joins the frozen modules
        method.learn(task)
        trained = modules(method.path) - frozen
        assert modules(method.fixed) == frozen
        for i, layer in enumerate(net.layers):
            for m, module in enumerate(layer):
                assert unchanged(module, before[i][m]) == ((i, m) not in trained), (task.index, i, m)
        assert not unchanged(net.head, head)
        assert (method.inference_path == (method.fixed | method.path)).all()
        assert method.path.sum(1).tolist() == ([1, 1] if task.index == 0 else [2, 2])
    assert method.footprint().params > method.footprint().base_params


def test_the_search_keeps_the_best_scoring_candidate(monkeypatch):
    method, stream, _ = build_method(RPSNet, *TINY)
    method.learn(stream.tasks[0])
    starts, ends, scores = [], [], iter([0.2, 0.9, 0.5])
    train = RPSNet.train_candidate

    def recorded(self, *args):
        starts.append(snapshot(self.net))
        stats = train(self, *args)
        ends.append(snapshot(self.net))
        return stats

    monkeypatch.setattr(RPSNet, "train_candidate", recorded)
    monkeypatch.setattr(RPSNet, "accuracy", lambda self, path, data, seen: next(scores))
    torch.manual_seed(3)
    row = method.learn(stream.tasks[1])
    assert row["chosen"] == 1 and row["val_accuracy"] == 0.9
    assert [unchanged(method.net, end) for end in ends] == [False, True, False]  # the kept model is candidate 1's
    method.net.load_state_dict(starts[0])
    assert all(unchanged(method.net, start) for start in starts)  # every candidate started from the same model
    paths = [path for path, _ in method.search]
    assert torch.equal(method.path, paths[1])
    assert len({tuple(p.flatten().tolist()) for p in paths}) > 1  # each candidate drew its own random path


def test_controller_distillation_and_random_paths():
    assert [distillation_weight(s, 1, 2.5) for s in range(5)] == [1, 1, 2.5, 5, 7.5]
    assert [distillation_weight(s, 2, 2.5) for s in range(5)] == [1, 1, 1, 2.5, 5]
    y = torch.tensor([2, 3, 0])
    old = torch.randn(3, 6)
    target = torch.nn.functional.one_hot(y, 6).float()
    target[:, :2] = old[:, :2]
    assert distillation(target, old, y, 2, 2.0).abs() < 1e-6  # the student matching the target: nothing to distil
    logits = torch.randn(3, 6)
    p, log_q = (target / 2).softmax(1), (logits / 2).log_softmax(1)
    expected = (p * (p.log() - log_q)).clamp(min=0).sum() / 3
    torch.testing.assert_close(distillation(logits, old, y, 2, 2.0), expected)
    torch.manual_seed(0)
    paths = torch.stack([random_path(3, 8, 2) for _ in range(400)])
    assert (paths.sum(2) == 2).all()
    assert paths.float().mean(0).sub(0.25).abs().max() < 0.08  # uniform over the modules


def test_resume_after_task_2_equals_uninterrupted(tmp_path):
    _, straight = run(tmp_path, *TINY, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *TINY, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))


def test_cli_runs_the_class_scenario_and_refuses_domain(tmp_path):
    done = clrun(tmp_path, *TINY_STREAM, *SMALL, "stream.scenario=class", "method.train.iterations=3")
    assert done.returncode == 0, done.stderr[-2000:]
    tasks, accuracy = run_tables(tmp_path)
    assert tasks["distillation_weight"].tolist() == [1, 1, 2.5]
    assert (tasks["chosen"] < 3).all() and tasks["modules_used"].is_monotonic_increasing
    assert set(accuracy["eval_mode"]) == {results.TASK_AGNOSTIC, results.TASK_AWARE}
    refused = clrun(tmp_path, *TINY_STREAM, *SMALL, "stream.scenario=domain")
    assert refused.returncode != 0
    assert "method rps_net does not support stream.scenario=domain" in refused.stderr + refused.stdout


def test_task_scenario_scores_each_task_within_its_classes(tmp_path):
    _, run_dir = run(tmp_path, *TINY_STREAM, *SMALL, "method.train.iterations=3")
    R = matrix(run_dir)
    assert R.shape == (3, 3) and np.isfinite(np.diag(R)).all()


@needs_shared("MNIST", "raw")
def test_learns_split_mnist_class_incrementally():
    method, stream, _ = build_method(
        RPSNet,
        "hardware=cpu",
        "hardware.threads=1",
        "method=rps_net",
        "stream=split_mnist",
        "stream.scenario=class",
        f"data.root={SHARED_DATA}",
        "stream.n_tasks=3",
        "stream.train_per_task=1000",
        "stream.test_per_task=300",
        "method.candidates=2",
        "method.memory=200",
        "method.train.epochs=3",
    )
    for task in stream.tasks:
        method.learn(task)
    x = torch.cat([stream.prepare(t.test.x, train=False) for t in stream.tasks])
    y = torch.cat([t.test.y + stream.class_offset(t.index) for t in stream.tasks])
    predicted = method.predict_agnostic(x, 3)[0].argmax(1)
    old = y < 2
    assert (predicted == y).float().mean() > 0.85  # 6 classes, no task id
    assert (predicted[old] == y[old]).float().mean() > 0.7  # task 0's digits survive two later tasks


def test_more_active_modules_than_modules_is_refused():
    one_line_error("more than method.modules", build_method, RPSNet, *TINY, "method.active=5")
