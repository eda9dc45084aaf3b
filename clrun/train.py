"""Shared training and evaluation loops that every method calls.

A method supplies what makes it that method (which parameters train, the loss);
this module owns the optimizer, schedule, batching, autocast and progress.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from clrun.data import iterate, prepare
from clrun.data.stream import Split, Stream
from clrun.hardware import Hardware


@dataclass
class FitStats:
    """What one training phase did."""

    epochs: int
    images: int
    seconds: float
    loss: float  # mean loss of the last epoch

    @classmethod
    def total(cls, phases: list["FitStats"]) -> "FitStats":
        """Several phases of one task as one: epochs, images and seconds summed, the last phase's loss."""
        return cls(
            epochs=sum(s.epochs for s in phases),
            images=sum(s.images for s in phases),
            seconds=sum(s.seconds for s in phases),
            loss=phases[-1].loss,
        )

    def row(self) -> dict:
        """The figures that go into `tasks.parquet`."""
        images_per_s = self.images / self.seconds if self.seconds > 0 else float("nan")
        return {"epochs": self.epochs, "train_s": self.seconds, "images_per_s": images_per_s, "train_loss": self.loss}


def make_progress() -> Progress:
    """The rich progress display: one bar per training phase with epoch, loss and images/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
    )


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg, hw: Hardware) -> torch.optim.Optimizer:
    """The optimizer an `OptimizerConfig` names (fused kernels on CUDA)."""
    params = list(params)
    fused = {"fused": True} if hw.device.type == "cuda" else {}
    name = cfg.optimizer.value
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **fused
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def make_schedule(optimizer: torch.optim.Optimizer, cfg, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule an `OptimizerConfig` names, over `epochs` epochs."""
    name = cfg.schedule.value
    if name == "multistep" and cfg.gammas:  # a factor per milestone, e.g. x0.2 at epoch 50, x0 at 70
        milestones, gammas = list(cfg.milestones), list(cfg.gammas)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: math.prod(g for m, g in zip(milestones, gammas, strict=True) if epoch >= m)
        )
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def fit(
    module: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[..., torch.Tensor],
    tensors: tuple[torch.Tensor, ...],
    cfg,
    stream: Stream,
    hw: Hardware,
    progress: Progress | None,
    label: str,
    extra_groups: Sequence[tuple[Iterable[torch.nn.Parameter], object]] = (),
    after_backward: Callable[[list[torch.optim.Optimizer]], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], bool] | None = None,
) -> FitStats:
    """Train `params` of `module` for `cfg.epochs` on `tensors` (uint8 images first), or for exactly
    `cfg.iterations` steps when that is set (the last epoch then stops part way).

    Each batch's images are augmented and normalised on the device; `loss_fn`
    receives the float images followed by the batch's other tensors.
    `extra_groups` are (params, OptimizerConfig) pairs with an optimizer and schedule
    of their own (e.g. masks under Adam beside weights under SGD); epochs and
    batch size come from `cfg`. `after_backward(optimizers)` runs before the optimizers
    step (e.g. to mask gradients; `optimizers[0]` holds `params`), `after_step(step)` after them, and
    `after_epoch(epochs_done)` after each epoch: returning True stops training.
    """
    n = len(tensors[0])
    steps_per_epoch = -(-n // cfg.batch_size)
    iterations = cfg.get("iterations")
    epochs = -(-iterations // steps_per_epoch) if iterations else cfg.epochs
    total_steps = iterations or epochs * steps_per_epoch
    groups = [(params, cfg), *extra_groups]
    optimizers = [make_optimizer(group, group_cfg, hw) for group, group_cfg in groups]
    schedules = [make_schedule(opt, group_cfg, epochs) for opt, (_, group_cfg) in zip(optimizers, groups, strict=True)]
    bar = None
    if progress is not None:
        bar = progress.add_task(label, total=total_steps, epoch=f"0/{epochs}", loss=float("nan"), ips=0.0)
    hw.compile(module)
    module.train()
    start, images, mean_loss, step, epochs_done = time.perf_counter(), 0, float("nan"), 0, 0
    for epoch in range(epochs):
        loss_sum = torch.zeros((), device=hw.device)
        seen = 0
        for batch in iterate(tensors, cfg.batch_size, shuffle=True):
            if step == total_steps:
                break
            x = hw.to_input(prepare(batch[0], stream.mean, stream.std, stream.augment))
            with hw.autocast():
                loss = loss_fn(x, *batch[1:])
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(optimizers)
            for optimizer in optimizers:
                optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
            loss_sum += loss.detach().float() * len(x)
            seen += len(x)
            if bar is not None:
                progress.advance(bar)
        for schedule in schedules:
            schedule.step()
        images += seen
        mean_loss = loss_sum.item() / seen
        if bar is not None:
            ips = images / (time.perf_counter() - start)
            progress.update(bar, epoch=f"{epoch + 1}/{epochs}", loss=mean_loss, ips=ips)
        epochs_done = epoch + 1
        if after_epoch is not None and after_epoch(epochs_done):
            break
    return FitStats(epochs=epochs_done, images=images, seconds=time.perf_counter() - start, loss=mean_loss)


def eval_batches(tensors: tuple[torch.Tensor, ...], stream: Stream, hw: Hardware, batch_size: int):
    """Batches of `tensors` (uint8 images first, then any aligned rows) in order, the images prepared as at
    test time (no augmentation)."""
    for x, *rest in iterate(tensors, batch_size, shuffle=False):
        yield hw.to_input(prepare(x, stream.mean, stream.std, augment=False)), *rest


@torch.no_grad()
def embed(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, stream: Stream, hw: Hardware, batch_size: int
) -> torch.Tensor:
    """`forward`'s fp32 outputs (e.g. features) for uint8 `images` prepared as at test time, in batches."""
    rows = []
    for (x,) in eval_batches((images,), stream, hw, batch_size):
        with hw.autocast():
            rows.append(forward(x).float())
    return torch.cat(rows)


@torch.inference_mode()
def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], split: Split, stream: Stream, hw: Hardware, batch_size: int
) -> float:
    """Top-1 accuracy of `predict` (float images -> logits) on a split."""
    correct = torch.zeros((), dtype=torch.long, device=split.y.device)
    for x, y in eval_batches((split.x, split.y), stream, hw, batch_size):
        with hw.autocast():
            logits = predict(x)
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / len(split)


@torch.inference_mode()
def agnostic_accuracy(
    predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    split: Split,
    stream: Stream,
    hw: Hardware,
    batch_size: int,
    task: int,
) -> tuple[float, float]:
    """Top-1 accuracy on task `task`'s split of a prediction made without its task id (labels as
    `stream.targets` gives them), and the share of images whose inferred task was `task` (NaN when
    `predict` infers none)."""
    correct = torch.zeros((), dtype=torch.long, device=split.y.device)
    right_task = torch.zeros((), dtype=torch.long, device=split.y.device)
    inferring = False
    for x, y in eval_batches((split.x, split.y), stream, hw, batch_size):
        with hw.autocast():
            logits, inferred = predict(x)
        correct += (logits.argmax(1) == stream.targets(y, task)).sum()
        if inferred is not None:
            inferring = True
            right_task += (inferred == task).sum()
    return correct.item() / len(split), right_task.item() / len(split) if inferring else float("nan")
