"""RCL and the shared REINFORCE controller: the policy gradient, candidates trained and the best kept, frozen old
units and bit-identical earlier logits, resume, the CLI, the refusal of conv backbones."""

import numpy as np
import pytest
import torch
from conftest import (
    TINY_STREAM,
    build_method,
    clrun,
    matrix,
    one_line_error,
    run,
    run_interrupted_then_resumed,
    task_inputs,
)

from clrun.methods.parts.controller import Baseline, Controller, ControllerConfig
from clrun.methods.rcl import RCL
from clrun.models.units import FREE

TINY = [*TINY_STREAM, "method=rcl", "backbone=mlp", "backbone.hidden=[24,16]", "method.choices=6"]
TINY += ["method.episodes=3", "method.train.iterations=6"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("baseline", ["ema", "critic"])
def test_policy_gradient_raises_the_probability_of_a_rewarded_action(baseline):
    torch.manual_seed(0)
    cfg = ControllerConfig(hidden=16, layers=1, lr=0.05, baseline=Baseline(baseline))
    controller = Controller(cfg, 5, 5, feedback=True)
    tokens = torch.zeros(2, 5)
    tokens[0] = torch.randn(5)
    chosen, other = torch.tensor([3, 1]), torch.tensor([0, 4])
    before = controller.log_prob(tokens, chosen).item(), controller.log_prob(tokens, other).item()
    assert controller.reinforce(tokens, chosen, 1.0) == 1.0  # no reward seen yet: the baseline is 0
    assert controller.log_prob(tokens, chosen).item() > before[0]
    controller.reset()
    controller.reinforce(tokens, other, -1.0)
    assert controller.log_prob(tokens, other).item() < before[1]
    # a fixed reward for one first action: sampling comes to prefer it
    controller.reset()
    for _ in range(60):
        actions = controller.sample(tokens)
        controller.reinforce(tokens, actions, float(actions[0] == 3))
    first = controller.logits(tokens)[0].softmax(0)
    assert first[3] > 0.6 and (torch.stack([controller.sample(tokens)[0] for _ in range(50)]) == 3).float().mean() > 0.5


def test_sampling_with_feedback_draws_from_the_policy_log_prob_scores():
    torch.manual_seed(1)
    controller = Controller(ControllerConfig(hidden=8, layers=2), 3, 3, feedback=True)
    tokens = torch.randn(2, 3)
    draws = torch.stack([controller.sample(tokens) for _ in range(400)])
    for pair in ([0, 1], [2, 2]):
        share = (draws == torch.tensor(pair)).all(1).float().mean().item()
        assert abs(share - controller.log_prob(tokens, torch.tensor(pair)).exp().item()) < 0.06


def test_candidates_are_trained_and_the_best_reward_kept(monkeypatch):
    method, stream, _ = build_method(RCL, *TINY)
    method.learn(stream.tasks[0])
    stored = {k: v.clone() for k, v in method.net.state_dict().items()}
    candidates, rewards = [], []
    train = method.train_candidate

    def spy(task, new, masks, data, phase, check):
        net, stats = train(task, new, masks, data, phase, check)
        candidates.append((net, new))
        return net, stats

    reinforce = Controller.reinforce
    monkeypatch.setattr(method, "train_candidate", spy)
    monkeypatch.setattr(Controller, "reinforce", lambda c, t, a, r: rewards.append(r) or reinforce(c, t, a, r))
    row = method.learn(stream.tasks[1])
    assert len(candidates) == len(rewards) == row["episodes"] == 3
    best = int(np.argmax(rewards))
    assert method.net is candidates[best][0] and row["reward"] == max(rewards)
    assert row["added_units"] == sum(int(n.sum()) for n in candidates[best][1])
    for net, new in candidates:  # each trained from the stored network: its new units moved, the old ones did not
        for i, (layer, n) in enumerate(zip(net.layers, new, strict=True)):
            weight, before, old = layer.weight.detach(), stored[f"layers.{i}.weight"], stored[f"owner{i}"] != FREE
            inputs = ~new[i - 1] if i else torch.ones(weight.shape[1], dtype=torch.bool)  # all but the cross weights
            assert torch.equal(weight[old][:, inputs], before[old][:, inputs])
            assert not n.any() or not torch.equal(weight[n], before[n])


def test_earlier_logits_stay_bit_identical_and_new_units_feed_older_ones():
    method, stream, _ = build_method(RCL, *TINY)
    logits, owned = [], []
    for task in stream.tasks:
        before = [layer.weight.detach().clone() for layer in method.net.layers]
        method.learn(task)
        net = method.net
        for j, expected in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), expected)
        for i, layer in enumerate(net.layers[1:] if owned else [], 1):  # earlier units: weights from earlier units
            rows, columns = owned[-1][i], owned[-1][i - 1]
            assert torch.equal(layer.weight[rows][:, columns], before[i][rows][:, columns])
        if owned:
            assert torch.equal(net.layers[0].weight[owned[-1][0]], before[0][owned[-1][0]])
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        owned.append([o != FREE for o in net.owners])
        assert all(torch.equal(m, o) for m, o in zip(method.masks[task.index], owned[-1], strict=True))  # stamps
    new = (method.net.owners[0] == 2) & ~owned[1][0]
    if new.any():  # RCL trains the weights from a task's new first-layer units into the older second-layer units
        older = method.net.owners[1] < 2
        assert method.net.layers[1].weight[older][:, new].abs().sum() > 0


def test_resume_equals_uninterrupted(tmp_path):
    _, straight = run(tmp_path, *TINY, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *TINY, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    R = matrix(straight)
    assert all((R[j:, j] == R[j, j]).all() for j in range(3))


def test_conv_backbones_are_refused_in_one_line():
    convnet = [o.replace("backbone=mlp", "backbone=convnet") for o in TINY if not o.startswith("backbone.hidden")]
    one_line_error("grows fully connected layers only", build_method, RCL, *convnet)


def test_cli_runs_rcl_and_class_scenario_with_task_inference(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=class", "method.task_id=entropy", "method.cost=params")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = clrun(tmp_path, *TINY, "stream.scenario=class")
    assert refused.returncode != 0 and "rcl" in refused.stderr + refused.stdout
