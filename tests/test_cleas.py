"""CLEAS: per-neuron reuse, drop and new units, bit-identical earlier logits, the empty-layer restart, the pool's
limits, the CLI, the refusal of conv backbones."""

import pytest
import torch
from conftest import TINY_STREAM, build_method, clrun, one_line_error, task_inputs

from clrun.methods.cleas import CLEAS
from clrun.methods.parts.controller import Controller
from clrun.models.units import FREE

TINY = [*TINY_STREAM, "method=cleas", "backbone=mlp", "backbone.hidden=[24,16]", "method.max_new=5"]
TINY += ["method.episodes=3", "method.train.iterations=6", "method.decide=sample"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tasks_reuse_drop_and_add_units_and_earlier_logits_stay_bit_identical():
    method, stream, _ = build_method(CLEAS, *TINY)
    logits, dropped = [], 0
    for task in stream.tasks:
        before = [o.clone() for o in method.net.owners]
        weights = [layer.weight.detach().clone() for layer in method.net.layers]
        method.learn(task)
        net, masks = method.net, method.masks[task.index]
        for j, expected in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), expected)
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        for i, (owner, old, mask) in enumerate(zip(net.owners, before, masks, strict=True)):
            new = owner == task.index
            assert torch.equal(mask & (old == FREE), new)  # a used free unit is a new one, and the task's
            assert int(new.sum()) <= (5 if task.index else 24 if i == 0 else 16)
            dropped += int(((old != FREE) & ~mask).sum())
            reused = (old != FREE) & mask
            assert torch.equal(net.layers[i].weight[old != FREE], weights[i][old != FREE])  # old units never move
            if i:  # a reused unit reads nothing from the task's new units below
                assert net.layers[i].weight[reused][:, net.owners[i - 1] == task.index].eq(0).all()
    assert dropped > 0  # sampled decisions drop some old units


def test_an_episode_adding_no_unit_to_a_layer_earns_minus_one_and_restarts_the_controller(monkeypatch):
    method, stream, _ = build_method(CLEAS, *TINY, "method.pool=24")  # layer 0 full after task 0: no free unit
    method.learn(stream.tasks[0])
    rewards, resets = [], []
    reinforce, reset = Controller.reinforce, Controller.reset
    monkeypatch.setattr(Controller, "reinforce", lambda c, t, a, r: rewards.append(r) or reinforce(c, t, a, r))
    monkeypatch.setattr(Controller, "reset", lambda c: resets.append(1) or reset(c))
    row = method.learn(stream.tasks[1])
    assert rewards == [-1.0] * 3 and len(resets) == 1 + 3  # one at construction, one per empty episode
    assert row["reward"] > 0  # the candidates were still trained and the best kept by its real reward
    assert int((method.net.owners[0] == 1).sum()) == 0


def test_pool_smaller_than_task_0_and_conv_backbones_are_refused_in_one_line():
    one_line_error("method.pool=10 is smaller", build_method, CLEAS, *TINY, "method.pool=10")
    convnet = [o.replace("backbone=mlp", "backbone=convnet") for o in TINY if not o.startswith("backbone.hidden")]
    one_line_error("grows fully connected layers only", build_method, CLEAS, *convnet)


def test_cli_runs_cleas_with_the_default_threshold_and_a_plateau_schedule_in_the_domain_scenario(tmp_path):
    overrides = [o for o in TINY if o != "method.decide=sample"]
    overrides += ["method.train.schedule=plateau", "method.train.patience=1", "method.train.batch_size=16"]
    done = clrun(tmp_path, *overrides, "stream.scenario=domain", "method.task_id=confidence")
    assert done.returncode == 0, done.stderr[-2000:]
