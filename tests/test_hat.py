"""HAT: gates at s_max, frozen weights and bit-identical earlier tasks, gradient factors, annealing, penalty,
per-task batch norm, storage, resume."""

import pytest
import torch
from conftest import (
    SPLIT_MNIST_3,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    learn_and_score,
    needs_shared,
    run,
    task_inputs,
)

from clrun.errors import ClrunError
from clrun.methods.parts.gate_training import gradient_factors
from clrun.models.backbones import VGG16BN
from clrun.models.gating import gated_layers
from clrun.train import Step

TINY = [
    *TINY_STREAM,
    "method=hat",
    "backbone=mlp",
    "backbone.width=0.25",
    "method.train.epochs=1",
]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # joansj/hat: plain SGD
        ["method.train.optimizer=adam", "method.train.lr=0.01", "method.train.weight_decay=0.1"],
        ["backbone=convnet", "method.train.momentum=0.9", "method.train.weight_decay=0.01"],  # per-task batch norm
        ["backbone=vgg16_bn", "backbone.width=0.125", "stream.n_tasks=2"],
    ],
    ids=["mlp-sgd", "mlp-adam-wd", "convnet-momentum-wd", "vgg16_bn"],
)
def test_binarized_gates_keep_earlier_logits_bit_identical(overrides):
    method, stream, _ = make("method.binarize=true", *overrides)
    logits, masks = [], []
    for task in stream.tasks:
        method.learn(task)
        for j, before in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), before), f"task {j} after task {task.index}"
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        masks.append(method.task_gates(task.index))
        for gate, embedding in zip(masks[-1], method.embeddings[task.index], strict=True):
            assert torch.equal(gate, (embedding > 0).float())  # exactly 0 or 1
            assert embedding.abs().max() <= 6.0  # the clamp
    for layer, cumulative in enumerate(method.cumulative):
        assert torch.equal(cumulative, torch.stack([m[layer] for m in masks]).amax(0))
    assert method.summary()["fractional_gates"] == 0


def test_sigmoid_gates_at_s_max_freeze_what_earlier_tasks_use():
    """Default (joansj/hat's test): gates sigmoid(s_max e); weights whose gradient factor is exactly 0 never move."""
    method, stream, _ = make()
    method.learn(stream.tasks[0])
    for gate, embedding in zip(method.task_gates(0), method.embeddings[0], strict=True):
        assert torch.equal(gate, torch.sigmoid(400 * embedding))
    fractional = sum(int(((g > 0) & (g < 1)).sum()) for g in method.task_gates(0))
    assert method.summary()["fractional_gates"] == fractional
    factors = gradient_factors(method.layers, method.cumulative)
    before = [(g.layer.weight.detach().clone(), g.layer.bias.detach().clone()) for g in method.layers]
    head = [p.detach().clone() for p in method.model.heads.heads[0].parameters()]
    method.learn(stream.tasks[1])
    for gated, (weight_factor, bias_factor), (weight, bias) in zip(method.layers, factors, before, strict=True):
        frozen = (weight_factor == 0).expand_as(weight)
        assert frozen.any() and (~frozen).any()
        assert torch.equal(gated.layer.weight[frozen], weight[frozen])
        assert not torch.equal(gated.layer.weight[~frozen], weight[~frozen])
        assert torch.equal(gated.layer.bias[bias_factor == 0], bias[bias_factor == 0])
    assert all(torch.equal(p, q) for p, q in zip(method.model.heads.heads[0].parameters(), head, strict=True))


def test_gradient_factors_by_hand_with_the_flatten_expansion():
    backbone = VGG16BN((3, 64, 64), 0.125)  # 2x2 positions left at the flatten
    layers = gated_layers(backbone, "hat")
    assert len(layers) == 15 and layers[13].input_repeat == 4 and layers[0].input_gate is None
    g = torch.Generator().manual_seed(0)
    cumulative = [(torch.rand(layer.units, generator=g) > 0.5).float() for layer in layers]
    factors = gradient_factors(layers, cumulative)
    first = factors[0][0].expand_as(layers[0].layer.weight)  # input side ungated: the output unit's gate only
    assert torch.equal(first[:, :, 1, 2], (1 - cumulative[0])[:, None].expand(8, 3))
    conv = factors[1][0][:, :, 0, 0]
    for i, j in [(0, 0), (3, 5), (7, 2)]:
        assert conv[i, j] == 1 - min(cumulative[1][i], cumulative[0][j])
    flat, bias = factors[13]
    channels = layers[12].units
    assert flat.shape == (layers[13].units, channels * 4)
    for i, j in [(0, 0), (5, 7), (63, channels * 4 - 1)]:
        assert flat[i, j] == 1 - min(cumulative[13][i], cumulative[12][j // 4])
    assert torch.equal(bias, 1 - cumulative[13])


def test_annealing_and_attention_penalty():
    method, _, _ = make()
    first, last = (Step(number=b, epoch=0, batch=b, batches=10, offset=64 * b, images=640) for b in (0, 9))
    assert method.anneal(first) == pytest.approx(1 / 400)
    assert method.anneal(last) == pytest.approx(1 / 400 + (400 - 1 / 400) * 0.9)  # code: offset i/N
    method.cfg.paper_anneal = True
    assert method.anneal(last) == pytest.approx(400)  # paper: reaches s_max at the last batch
    gates = [torch.full((layer.units,), 0.25) for layer in method.layers]
    assert method.attention_penalty(gates).item() == pytest.approx(0.25)  # first task: the mean gate
    method.cumulative = [torch.zeros(layer.units) for layer in method.layers]
    method.cumulative[0][:50] = 1.0  # half of layer 0's units used earlier: they do not count
    gates[1][:] = 1.0
    expected = (50 * 0.25 + 100 * 1.0) / (50 + 100)
    assert method.attention_penalty(gates).item() == pytest.approx(expected)


def test_footprint_counts_shared_weights_once_and_per_task_parts():
    method, stream, _ = make("backbone=convnet", "stream.n_tasks=2")
    for task in stream.tasks:
        method.learn(task)
    convs = 3 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9  # bias-free convs at width 0.25: 8, 16, 32 channels
    units = 8 + 16 + 32
    head = 32 * 2 + 2
    per_task = units + 2 * units  # embeddings + batch-norm weight and bias
    footprint = method.footprint()
    assert footprint.params == convs + 2 * head + 2 * per_task
    statistics = 2 * units * 4 + 3 * 8  # running mean and var (fp32), num_batches_tracked (int64) of 3 BNs
    assert footprint.bytes == 4 * (convs + 2 * head) + 2 * (4 * per_task + statistics) + 4 * units
    assert footprint.base_params == convs + 2 * units + head


def test_capacity_is_the_share_of_units_with_cumulative_gate_above_half():
    method, stream, _ = make()
    method.learn(stream.tasks[0])
    used = sum(int((method.task_gates(0)[i] > 0.5).sum()) for i in range(2))
    assert method.summary()["capacity"] == used / 200


def test_residual_backbones_are_refused():
    with pytest.raises(ClrunError, match="chain backbones only"):
        make("backbone=resnet18", "backbone.width=0.125")


def test_resume_equals_uninterrupted_and_class_scenario_runs(tmp_path):
    overrides = [*TINY, "backbone=convnet", "stream.train_per_task=32", "stream.test_per_task=16"]
    assert_resume_is_bit_identical(tmp_path, *overrides)  # weights, masks, buffers
    summary, _ = run(tmp_path, *TINY, "stream.scenario=class", "method.task_id=entropy", name="class")
    assert 0 <= summary["acc"] <= 1


@needs_shared("MNIST")
def test_learns_split_mnist_with_next_to_no_forgetting():
    method, stream, _ = build_method(
        None,
        *TINY,
        *SPLIT_MNIST_3,
        "method.train.epochs=3",
    )
    accuracy = learn_and_score(method, stream)
    assert min(accuracy[j, j] for j in range(3)) > 0.85
    # default sigmoid(s_max e) gates: the few fractional gates let earlier logits move by ~1e-3 at most
    assert all(abs(accuracy[2, j] - accuracy[j, j]) <= 0.01 for j in range(3))
