"""The weight-sharing core: frozen weights never move, views survive growth and reloads, masks and storage."""

import math

import pytest
import torch
from conftest import build_method, task_inputs

from clrun.methods.parts.weight_sharing import WeightSharingMethod
from clrun.models.shared_net import MaskedWeight, shared_layers

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


def unfused(weight, own_mask, old_mask, pick, threshold):
    """The masked weight as plain autograd expressions (the code before `MaskedWeight`), `pick` over every weight."""
    old = weight.detach() * old_mask
    if pick is not None:
        old = old * ((pick > threshold).to(pick.dtype) + pick - pick.detach())
    return weight * own_mask + old


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)  # signed zeros and every rounding bit compared


@pytest.mark.parametrize("picking", [True, False])
@pytest.mark.parametrize("decay", [0.0, 4e-5])
@pytest.mark.parametrize("free", [True, False])
def test_fused_masked_weight_equals_the_unfused_expression_bit_for_bit(picking, decay, free):
    """`free`: some weights belong to no task (keep mask given), else every weight is own or earlier (keep None).
    `decay`: weight decay in the fused backward against decay added to the own weights' gradient after it."""
    torch.manual_seed(0)
    threshold, shape, tag = 5e-3, (64, 32, 3, 3), 3
    owner = torch.randint(0 if free else 1, 4, shape)  # 0 free, 1-2 earlier tasks, 3 the task being learned
    own, old = owner == tag, (owner >= 1) & (owner < tag)
    index = old.flatten().nonzero().squeeze(1)
    weight = torch.randn(shape)
    weight[0, 0] = 0.0  # signed zeros keep their sign through both
    weight[0, 1] = -0.0
    full = torch.rand(shape) * 0.02 + 0.0001
    edge = torch.tensor([threshold, torch.nextafter(torch.tensor(threshold), torch.tensor(1.0)).item(), 1.0, -1.0])
    full.view(-1)[index[: 4 * 64]] = edge.repeat(64)  # exactly at, just above, far above and below the threshold
    full.view(-1)[index[-1]] = torch.nextafter(torch.tensor(threshold), torch.tensor(0.0))
    upstream = torch.randn(shape)

    w1 = weight.clone().requires_grad_()
    p1 = full.clone().requires_grad_() if picking else None
    expected = unfused(w1, own.float(), old.float(), p1, threshold)
    expected.backward(upstream)
    w1.grad.add_(w1.detach() * own.float(), alpha=decay)  # the decay as it was added before

    w2 = weight.clone().requires_grad_()
    p2 = full.flatten()[index].clone().requires_grad_() if picking else None
    keep = (own | old).float() if free else None
    old_weights = weight.flatten()[index] if picking else None
    fused = MaskedWeight.apply(w2, own.float(), keep, index if picking else None, old_weights, p2, threshold, decay)
    fused.backward(upstream)

    assert torch.equal(bits(fused), bits(expected))
    assert torch.equal(bits(w2.grad[own]), bits(w1.grad[own])) and (w2.grad[~own] == 0).all()  # zeros' signs may differ
    if decay:
        assert not torch.equal(w2.grad[own], (upstream * own)[own])  # the decay is there
    if picking:
        assert torch.equal(bits(p2.grad), bits(p1.grad.flatten()[index]))
        assert (p1.grad.flatten()[~old.flatten()] == 0).all()  # the entries the compact mask leaves out: no gradient
        assert (fused.flatten()[index[: 4 * 64]].view(64, 4)[:, 0] == 0).all()  # at the threshold: not picked
        assert not torch.equal(fused, unfused(w1, own.float(), old.float(), None, threshold))  # picking matters
    if not free and not picking:
        assert fused._base is w2  # the weight as it is: no copy, no multiplication


def test_picking_mask_and_its_adam_state_cover_only_earlier_tasks_weights():
    method, stream, _ = make()
    net = method.net
    net.begin_task(1, picking=False)
    net.prune(1, 0.6)
    net.end_task(1)
    net.begin_task(2, picking=True)
    layers = shared_layers(net.backbone).values()
    earlier = sum(int((layer.owner == 1).sum()) for layer in layers)
    assert 0 < earlier < 0.5 * sum(layer.weight.numel() for layer in layers)
    own_start = [layer.weight.detach()[layer.owner == 2].clone() for layer in layers]
    optimizer = torch.optim.Adam(net.picks(), lr=1e-2)
    weights = torch.optim.SGD(net.shared_weights(), lr=0.1, momentum=0.9)
    net.own_weight_decay(0.01)
    net.heads.add(net.backbone.out_features, 2)
    x = torch.randn(8, *stream.input_shape)
    for _ in range(3):
        optimizer.zero_grad()
        weights.zero_grad()
        net.forward_current(x, 0).sum().backward()
        optimizer.step()
        weights.step()
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * earlier  # Adam's two moments, one entry per pickable weight
    for layer, start in zip(layers, own_start, strict=True):  # earlier weights did not move (own weights did):
        assert not torch.equal(layer.weight.detach()[layer.owner == 2], start)  # the values gathered at the task's
        assert torch.equal(bits(torch.take(layer.weight.detach(), layer.old)), bits(layer.old_weights))  # start hold
    record = net.end_task(2)
    assert sum(int(p.sum()) for p in record["pick"].values()) <= earlier
    for name, layer in shared_layers(net.backbone).items():
        assert not (record["pick"][name] & (layer.owner != 1)).any()  # picks only among task 1's weights


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


def test_compiled_masked_weight_adds_the_same_weight_decay():
    """torch.compile of a forward through `MaskedWeight` (hardware.compile): the weight's gradient, decay included,
    equals the eager one to float rounding (torch 2.14 compiled took an `alpha` read from the autograd context as 1:
    ten times the decay here)."""
    torch.manual_seed(0)
    weight, x = torch.randn(8, 5), torch.randn(4, 5)
    own = (torch.rand(8, 5) > 0.5).float()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return (x @ MaskedWeight.apply(w, own, None, None, None, None, None, 0.1).t()).pow(2).sum()

    grads = []
    for function in (loss, torch.compile(loss)):
        w = weight.clone().requires_grad_()
        function(w).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[1][own == 0] == 0).all()
