"""The shared training pieces: hardware resolution, optimizers and schedules, method-level behaviour."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_STREAM, build_method, clrun, compose_config, step_with_the_same_gradients
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from clrun.config import HardwareConfig
from clrun.errors import ClrunError
from clrun.hardware import resolve_hardware
from clrun.methods.base import mixed_task_loss, task_loss
from clrun.methods.finetune import Finetune
from clrun.train import MacCounter, make_optimizer, make_schedule

TINY = ["hardware=cpu", "backbone=mlp", "stream.train_per_task=64", "stream.test_per_task=32", "stream.n_tasks=2"]


def hardware(**fields):
    return OmegaConf.structured(HardwareConfig(name="test", **fields))


def test_cpu_hardware_is_plain_fp32():
    hw = resolve_hardware(compose_config("hardware=cpu").hardware)
    assert hw.device.type == "cpu" and hw.autocast_dtype is None and not hw.channels_last


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_auto_falls_back_to_cpu_and_cuda_request_fails_clearly():
    assert resolve_hardware(compose_config("hardware=auto").hardware).device.type == "cpu"
    with pytest.raises(ClrunError, match="hardware.device=cuda but no CUDA device"):
        resolve_hardware(compose_config("hardware=gpu").hardware)


def test_bf16_precision_autocasts():
    hw = resolve_hardware(compose_config("hardware=cpu", "hardware.precision=bf16").hardware)
    with hw.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def train_config(*overrides):
    return compose_config(*overrides).method.train


def lrs(optimizer, schedule, epochs):
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_multistep_and_cosine_schedules():
    hw = resolve_hardware(compose_config("hardware=cpu").hardware)
    params = [torch.nn.Parameter(torch.zeros(1))]
    cfg = train_config(
        "method.train.optimizer=sgd",
        "method.train.lr=1.0",
        "method.train.schedule=multistep",
        "method.train.milestones=[2,3]",
        "method.train.gamma=0.1",
        "method.train.epochs=4",
    )
    optimizer = make_optimizer(params, cfg, hw)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert lrs(optimizer, make_schedule(optimizer, cfg, 4), 4) == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cfg = train_config("method.train.lr=1.0", "method.train.schedule=cosine", "method.train.epochs=2")
    optimizer = make_optimizer(params, cfg, hw)
    assert isinstance(optimizer, torch.optim.Adam)
    assert lrs(optimizer, make_schedule(optimizer, cfg, 2), 2) == pytest.approx([1.0, 0.5])
    cfg = compose_config("method=cpg").method.mask_train  # x0.2 at epoch 50, x0 at 70: a factor per milestone
    optimizer = make_optimizer(params, cfg, hw)
    seen = lrs(optimizer, make_schedule(optimizer, cfg, 80), 80)
    assert (seen[49], seen[50], seen[69], seen[70]) == pytest.approx((5e-4, 1e-4, 1e-4, 0.0))


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.train.optimizer=sgd", "method.train.nesterov=true"],
        ["method.train.optimizer=adam"],
        ["method.train.optimizer=adamw"],
    ],
)
def test_cpu_optimizers_use_foreach_kernels_that_step_bit_for_bit_as_the_single_tensor_loop(overrides):
    hw = resolve_hardware(compose_config("hardware=cpu").hardware)
    cfg = train_config(*overrides, "method.train.weight_decay=1e-3", "method.train.lr=0.01")
    torch.manual_seed(0)
    start = [torch.randn(300, 70), torch.randn(70), torch.randn(5, 3, 3, 3)]
    fast_params, slow_params = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]
    fast = make_optimizer(fast_params, cfg, hw)
    assert fast.defaults["foreach"] is True
    slow = make_optimizer(slow_params, cfg, hw)
    for group in slow.param_groups:
        group["foreach"] = False  # the single-tensor loop, as before
    step_with_the_same_gradients([(fast_params, fast), (slow_params, slow)], steps=4)
    for got, want, first in zip(fast_params, slow_params, start, strict=True):
        assert torch.equal(got, want) and not torch.equal(got, first)


def make_method(method_class, *overrides):
    return build_method(method_class, *TINY, *overrides)[:2]


def test_finetune_leaves_earlier_heads_untouched():
    # weight decay and momentum would move head 0 if it were in the optimizer
    method, stream = make_method(Finetune, "method.train.optimizer=sgd", "method.train.weight_decay=0.1")
    method.learn(stream.tasks[0])
    head0 = [p.detach().clone() for p in method.model.heads.heads[0].parameters()]
    backbone = [p.detach().clone() for p in method.model.backbone.parameters()]
    method.learn(stream.tasks[1])
    for before, after in zip(head0, method.model.heads.heads[0].parameters(), strict=True):
        assert torch.equal(before, after)
    assert any(not torch.equal(b, a) for b, a in zip(backbone, method.model.backbone.parameters(), strict=True))


def test_mixed_task_loss_routes_each_sample_to_its_own_head():
    method, stream = make_method(Finetune)
    model = method.model
    model.add_head(2)
    model.add_head(3)
    x = torch.randn(6, *stream.input_shape)
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    t = torch.tensor([1, 0, 1, 1, 0, 0])
    expected = sum(F.cross_entropy(model(x[i : i + 1], int(t[i])), y[i : i + 1]) for i in range(6)) / 6
    assert mixed_task_loss(model, stream, 2)(x, y, t, None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_plateau_schedule_decays_after_patience_and_stops_one_epoch_after_the_last_decay():
    """CPG's fine-grained schedule at patience 2, 2 decays: x0.1 for the weights at each decay, the masks' group
    x0.2 at the first only (gammas [0.2]); validation 0.5, 0.4, 0.4 (decay), 0.6, 0.6, 0.6 (decay), then a stop."""
    method, stream = make_method(
        Finetune,
        "method.train.epochs=20",
        "method.train.batch_size=64",  # one step per epoch
        "method.train.lr=1.0",
        "method.train.optimizer=sgd",
        "method.train.schedule=plateau",
        "method.train.patience=2",
        "method.train.max_decays=2",
    )
    task = stream.tasks[0]
    method.model.add_head(task.n_classes)
    extra = torch.nn.Parameter(torch.zeros(1))
    masks = OmegaConf.merge(method.cfg.train, {"schedule": "plateau", "lr": 0.5, "gammas": [0.2]})
    accuracies, lrs_seen = iter([0.5, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6, 0.9]), []
    loss = task_loss(method.model, 0, stream)
    stats = method.fit(
        task,
        method.model,
        method.model.parameters(),
        lambda x, y, step: loss(x, y, step) + 0 * extra.sum(),
        groups=[([extra], masks)],
        after_backward=lambda step, optimizers: lrs_seen.append([o.param_groups[0]["lr"] for o in optimizers]),
        validate=lambda: next(accuracies),
    )
    assert stats.epochs == 7
    expected = [(1.0, 0.5)] * 3 + [(0.1, 0.1)] * 3 + [(0.01, 0.1)]
    assert [lr for pair in lrs_seen for lr in pair] == pytest.approx([lr for pair in expected for lr in pair])


def test_plateau_schedule_validates_on_the_test_split_by_default():
    """Any method's plateau phase measures the task's test accuracy after each epoch (CPG validates on it)."""
    method, stream = make_method(
        Finetune, "method.train.epochs=3", "method.train.schedule=plateau", "method.train.patience=1"
    )
    measured = []
    test_accuracy = method.test_accuracy
    method.test_accuracy = lambda task: measured.append(test_accuracy(task)) or measured[-1]
    method.learn(stream.tasks[0])
    assert len(measured) == 3 and measured[-1] == method.test_accuracy(stream.tasks[0])


def test_mac_counter_agrees_with_flop_counter_and_survives_a_gradient_penalty():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)
    )
    x = torch.randn(4, 3, 8, 8)
    with FlopCounterMode(display=False) as reference:
        net(x).sum().backward()
    with MacCounter() as counter:
        net(x).sum().backward()
    assert counter.macs == reference.get_total_flops() // 2 > 0
    real = x.clone().requires_grad_()
    with MacCounter() as counter:  # WGAN-GP's penalty: a gradient of a gradient
        (grad,) = torch.autograd.grad(net(real).sum(), real, create_graph=True)
        (grad.square().sum()).backward()
    assert counter.macs > 0


def test_a_loss_that_stops_being_finite_ends_the_phase_with_one_line_naming_the_step():
    method, stream = make_method(Finetune, "method.train.epochs=3", "method.train.batch_size=16")
    task, model = stream.tasks[0], method.model
    model.add_head(len(task.classes))
    plain = task_loss(model, 0, stream)

    def loss(x, y, step):
        return plain(x, y, step) * (float("nan") if step.number >= 5 else 1.0)  # 4 batches an epoch: epoch 2

    data = (task.train.x, task.train.y)
    with pytest.raises(ClrunError, match=r"^task 0: the training loss is not finite \(nan\) from step 5 .*\(epoch 2\)"):
        method.trainer.fit(model, method.cfg.train, list(model.parameters()), loss, data, "task 0", task=0)


def test_a_diverging_run_stops_with_one_line_through_the_cli(tmp_path):
    done = clrun(tmp_path, *TINY_STREAM, "method.train.optimizer=sgd", "method.train.lr=1e20")
    assert done.returncode == 2 and done.stderr.startswith("clrun: error: task 0 0-1: the training loss is not finite")
    assert "Traceback" not in done.stderr


def test_the_phase_bar_shows_loss_and_speed_within_an_epoch_and_stepless_phases_say_what_they_do(monkeypatch):
    from clrun import train
    from clrun.methods.ewc import EWC

    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)  # refresh at every step
    method, stream = make_method(EWC, "method=ewc", "method.train.epochs=1", "method.train.batch_size=16")
    progress = train.make_progress()
    shown = []
    add, update = progress.add_task, progress.update
    monkeypatch.setattr(
        progress, "add_task", lambda *a, **k: shown.append(("add", a[0], k.get("info"))) or add(*a, **k)
    )
    monkeypatch.setattr(
        progress, "update", lambda bar, **k: shown.append(("update", bar, k.get("info"))) or update(bar, **k)
    )
    method.trainer.progress = progress
    method.learn(stream.tasks[0])  # 64 images in 4 steps of one epoch
    infos = [info for kind, _, info in shown if kind == "update" and info]
    assert sum("loss" in info for info in infos) >= 4  # every step, not once an epoch
    assert ("add", "task 0 0-1", "computing the parameters' importance") in shown  # the Fisher pass
    assert not progress.tasks  # finished phases leave the display
