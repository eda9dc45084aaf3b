"""The weight-sharing core: frozen weights never move, views survive growth and reloads, masks and storage."""

import math

import pytest
import torch
from conftest import build_method, task_inputs

from clrun.methods.parts.weight_sharing import WeightSharingMethod
from clrun.models.shared_net import binarize, shared_layers

TINY = [
    "hardware=cpu",
    "backbone=convnet",
    "backbone.width=0.25",
    "stream.n_tasks=3",
    "stream.train_per_task=96",
    "stream.test_per_task=32",
    "method.train.epochs=1",
    "method.train.batch_size=32",
]


def make(*overrides):
    return build_method(WeightSharingMethod, *TINY, *overrides)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_earlier_weights_never_move_and_views_stay_bit_identical(optimizer):
    method, stream, cfg = make(
        f"method.train.optimizer={optimizer}",
        "method.train.weight_decay=0.1",
        "method.train.nesterov=true" if optimizer == "sgd" else "method.train.lr=0.01",
    )
    net, first_logits = method.net, None
    for task in stream.tasks:
        tag = task.index + 1
        net.begin_task(tag, picking=task.index > 0)
        method.add_head(task)
        before = {name: layer.weight.detach().clone() for name, layer in shared_layers(net.backbone).items()}
        method.train_phase(task, cfg.method.train, "train", mask_cfg=cfg.method.train)
        for name, layer in shared_layers(net.backbone).items():
            frozen = (layer.owner >= 1) & (layer.owner < tag)
            assert torch.equal(layer.weight[frozen], before[name][frozen]), name
            assert not torch.equal(layer.weight[layer.owner == tag], before[name][layer.owner == tag])
        net.prune(tag, 0.5)
        net.end_task(tag)
        if task.index == 0:
            first_logits = method.predict(task_inputs(stream, 0), 0).clone()
            net.grow(1.5)  # growth between tasks leaves task 0's view as it was
        assert torch.equal(method.predict(task_inputs(stream, 0), 0), first_logits)

    reloaded, _, _ = make(f"method.train.optimizer={optimizer}")
    reloaded.load_state_dict(method.state_dict())
    for j in range(3):
        assert torch.equal(reloaded.predict(task_inputs(stream, j), j), method.predict(task_inputs(stream, j), j))


def test_growth_widens_by_sqrt_of_the_parameter_multiplier_and_copies_old_weights():
    method, _, _ = make()
    net = method.net
    old = {name: layer.weight.detach().clone() for name, layer in shared_layers(net.backbone).items()}
    net.grow(2.25)  # channels x1.5
    for name, layer in shared_layers(net.backbone).items():
        block = layer.weight[tuple(slice(0, n) for n in old[name].shape)]
        assert torch.equal(block, old[name])
        assert (layer.owner == 0).all()
    assert net.backbone.out_features == round(round(128 * 0.25) * 1.5)


def test_prune_releases_the_target_share_of_the_pool_per_layer():
    method, _, _ = make()
    net = method.net
    net.begin_task(1, picking=False)
    net.prune(1, 0.3)
    for layer in shared_layers(net.backbone).values():
        assert (layer.owner == 0).sum().item() == round(0.3 * layer.owner.numel())
        released = layer.owner == 0
        assert layer.weight.detach().abs()[released].max() <= layer.weight.detach().abs()[~released].min()


def test_binarize_thresholds_forward_and_passes_gradient_straight_through():
    mask = torch.tensor([0.004, 0.006, 0.01], requires_grad=True)
    out = binarize(mask, 5e-3)
    assert out.tolist() == [0.0, 1.0, 1.0]
    out.sum().backward()
    assert mask.grad.tolist() == [1.0, 1.0, 1.0]


def test_storage_counts_weights_owner_map_picks_private_tensors_and_heads():
    method, stream, cfg = make()
    net = method.net
    for task in stream.tasks[:2]:
        net.begin_task(task.index + 1, picking=task.index > 0)
        method.add_head(task)
        net.end_task(task.index + 1)
    weights = sum(layer.weight.numel() for layer in shared_layers(net.backbone).values())
    heads = sum(p.numel() for p in net.heads.parameters())
    bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    affine = sum(m.weight.numel() + m.bias.numel() for m in bn)
    statistics_bytes = sum(m.running_mean.numel() + m.running_var.numel() for m in bn) * 4 + len(bn) * 8
    pick_bits = sum(math.ceil(layer.weight.numel() / 8) for layer in shared_layers(net.backbone).values())
    params, size = net.storage()
    assert params == weights + heads + 2 * affine
    assert size == weights * 5 + heads * 4 + 2 * (affine * 4 + statistics_bytes) + pick_bits


def test_picking_masks_are_neither_private_tensors_nor_weight_parameters():
    method, stream, _ = make()
    net = method.net
    net.begin_task(1, picking=False)
    net.end_task(1)
    net.begin_task(2, picking=True)
    picks = {id(p) for p in net.picks()}
    assert picks and not picks & {id(p) for p in net.private_parameters()}
    assert not [key for key in net.private_state() if key.endswith("pick")]
