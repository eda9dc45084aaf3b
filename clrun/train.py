"""The training recipe and loop every method trains through, and the evaluation passes.

A method supplies what makes it that method (which parameters train, the loss, hooks);
`Trainer.fit` owns the optimizer, schedule, batching, augmentation, autocast and progress.
"""

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, NULL_OR_AT_LEAST_1, POSITIVE, Rule, checked
from clrun.data import iterate
from clrun.data.stream import Pairs, Split, Stream
from clrun.errors import ClrunError
from clrun.hardware import Hardware
from clrun.metrics import verification_accuracy


class Optimizer(Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(Enum):
    constant = "constant"
    multistep = "multistep"
    cosine = "cosine"
    # x gamma (gammas: the k-th factor at the k-th decay, 1 after them) once the phase's validation accuracy has
    # not risen for `patience` epochs (CPG's fine-grained and face code); a second group (masks) decays with the
    # phase's, and stays constant in a phase of another schedule
    plateau = "plateau"


@dataclass
class OptimizerConfig:
    """An optimizer and its per-epoch learning-rate schedule (for a second parameter group, e.g. masks)."""

    optimizer: Optimizer = Optimizer.adam
    lr: float = checked(NON_NEGATIVE, 0.001)  # 0: the group does not move
    momentum: float = checked(FRACTION, 0.9)  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = checked(NON_NEGATIVE, 0.0)
    schedule: Schedule = Schedule.constant
    milestones: list[int] = field(default_factory=list)  # epochs where multistep multiplies lr by gamma
    gamma: float = checked(POSITIVE, 0.1)
    # multistep: a factor per milestone instead of gamma; plateau: a factor per decay
    gammas: list[float] = checked(
        Rule(lambda v: all(g >= 0 for g in v), "a list of non-negative factors"), factory=list
    )


@dataclass
class TrainConfig(OptimizerConfig):
    """One training phase: optimizer, learning-rate schedule, epochs, batch size."""

    epochs: int = checked(AT_LEAST_1, 2)
    batch_size: int = checked(AT_LEAST_1, 128)
    # train exactly this many steps instead (epochs then follow from it)
    iterations: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)
    patience: int = checked(AT_LEAST_1, 5)  # plateau: epochs without a validation gain before a decay
    # plateau: stop the phase one epoch after this many decays (CPG: 3); null: run every epoch
    max_decays: Optional[int] = checked(NULL_OR_AT_LEAST_1, 3)


class MacCounter(TorchDispatchMode):
    """Counts the multiply-accumulates of the matmuls and convolutions run inside it, forward and backward, by
    torch.utils.flop_counter's formulas (its FlopCounterMode also tracks modules, through hooks that break
    `autograd.grad` with `create_graph`, e.g. a gradient penalty)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.macs += formula(*args, **kwargs, out_val=out) // 2
        return out


def recipe_images(recipe, n: int) -> int:
    """The images one training phase under `recipe` (a `TrainConfig`) trains on `n` images: `iterations` batches,
    else `epochs` passes."""
    iterations = recipe.get("iterations")
    return iterations * recipe.batch_size if iterations else recipe.epochs * n


@dataclass(frozen=True)
class Step:
    """Where a training phase is when it trains a batch (what loss functions and hooks are handed)."""

    number: int  # steps done before this one in the phase
    epoch: int  # 0-based
    batch: int  # the batch's index within its epoch, 0-based
    batches: int  # batches per full epoch
    offset: int  # images of the epoch before this batch
    images: int  # images per epoch

    @property
    def epoch_progress(self) -> float:
        """How far through its epoch the batch is by batch number: 0 for the first batch, 1 for the last."""
        return self.batch / (self.batches - 1) if self.batches > 1 else 1.0


@dataclass
class EpochEnd:
    """What `Trainer.fit` hands its epoch callbacks after each epoch (the figures it has at hand: no extra sync)."""

    phase: str  # the phase's label, e.g. `task 1 split_mnist-1: retrain`
    task: int | None  # the task whose images it trains on (None: several)
    epoch: int  # epochs done in the phase
    loss: float  # the epoch's mean loss
    images_per_s: float  # the phase's throughput so far


@dataclass
class FitStats:
    """What one training phase did."""

    epochs: int
    images: int
    seconds: float
    loss: float  # mean loss of the last epoch
    # multiply-accumulates of one training image's step (every forward and backward pass its loss makes), counted
    # by `MacCounter` on the phase's first batch (matmuls and convolutions); NaN: not counted
    macs_per_image: float = math.nan
    macs: float = math.nan  # spent in the phase: macs_per_image x images

    @classmethod
    def total(cls, phases: Sequence["FitStats"]) -> "FitStats":
        """Several phases of one task as one: epochs, images, seconds and MACs summed, the last phase's loss and
        MACs per image (no phase: zeros and NaNs)."""
        return cls(
            epochs=sum(s.epochs for s in phases),
            images=sum(s.images for s in phases),
            seconds=sum(s.seconds for s in phases),
            loss=phases[-1].loss if phases else math.nan,
            macs_per_image=phases[-1].macs_per_image if phases else math.nan,
            macs=sum(s.macs for s in phases) if phases else math.nan,
        )

    def row(self) -> dict:
        """The figures that go into `tasks.parquet`."""
        images_per_s = self.images / self.seconds if self.seconds > 0 else float("nan")
        return {
            "epochs": self.epochs,
            "train_s": self.seconds,
            "images_per_s": images_per_s,
            "train_loss": self.loss,
            "train_macs": self.macs,
            "macs_per_image": self.macs_per_image,
        }


PROGRESS_SECONDS = 0.5  # a phase bar's loss and images/s are refreshed at most this often (one device sync each)


def make_progress() -> Progress:
    """The rich progress display: the run's bar (tasks, ETA) and the running phase's (epoch, loss, images/s, ETA),
    or a stepless phase's description (`Trainer.status`); each bar's text is its `info` field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
    )


def phase_info(epoch: int, epochs: int, loss: float, images_per_s: float) -> str:
    """A phase bar's text."""
    return f"epoch {epoch}/{epochs}" + ("" if math.isnan(loss) else f" loss {loss:.4f} {images_per_s:.0f} img/s")


def optimizer_kernels(device: torch.device) -> dict:
    """The fastest optimizer implementation that keeps results: fused kernels on CUDA; on the CPU the foreach one
    (PyTorch's fused CPU kernels round differently from the single-tensor loop; foreach does not)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg, hw: Hardware) -> torch.optim.Optimizer:
    """The optimizer an `OptimizerConfig` names (`optimizer_kernels`)."""
    params = list(params)
    kernels = optimizer_kernels(hw.device)
    name = cfg.optimizer.value
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **kernels
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernels)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernels)


def _resume_state(optimizer: torch.optim.Optimizer, carry: dict) -> None:
    """Give `optimizer`'s parameters their state in `carry` (maybe loaded on the CPU), placed as the optimizer keeps
    it: tensors on the parameter's device, Adam's `step` there only for the fused kernels (else on the CPU)."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in carry:
                optimizer.state[p] = {
                    k: v.to(p.device if fused or k != "step" else "cpu") if torch.is_tensor(v) else v
                    for k, v in carry[p].items()
                }


class Plateau:
    """When the validation accuracy has stopped rising: counts epochs without a gain and the decays so far."""

    def __init__(self, patience: int, max_decays: int | None):
        self.patience, self.max_decays = patience, max_decays
        self.best, self.stale, self.decays = -math.inf, 0, 0

    def update(self, accuracy: float) -> bool:
        """Record an epoch's validation accuracy; return True when training should stop (CPG's order: the stop
        test comes before this epoch's decay, so the phase runs one epoch after its last decay)."""
        if accuracy > self.best:
            self.best, self.stale = accuracy, 0
        else:
            self.stale += 1
        if self.max_decays is not None and self.decays >= self.max_decays:
            return True
        if self.stale >= self.patience:
            self.decays, self.stale = self.decays + 1, 0
        return False

    def factor(self, cfg) -> float:
        """The learning-rate factor of a group under `cfg` after the decays so far."""
        if cfg.gammas:
            return math.prod(cfg.gammas[: self.decays])
        return cfg.gamma**self.decays


def make_schedule(
    optimizer: torch.optim.Optimizer, cfg, epochs: int, plateau: Plateau | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule an `OptimizerConfig` names, over `epochs` epochs (`plateau`: the
    phase's validation record, which a plateau schedule follows)."""
    name = cfg.schedule.value
    if name == "plateau":  # without the phase's record (a group whose phase has another schedule): constant
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: plateau.factor(cfg) if plateau else 1.0)
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


Loss = Callable[..., torch.Tensor]  # loss(x, *other tensors of the batch, step) -> scalar
Groups = Sequence[tuple[Iterable[torch.nn.Parameter], OptimizerConfig]]


class Trainer:
    """Trains on a stream's images on one hardware; shows each phase in `progress` (set by the run; None: no
    display)."""

    def __init__(self, stream: Stream, hw: Hardware):
        self.stream = stream
        self.hw = hw
        self.progress: Progress | None = None
        self.epoch_callbacks: list[Callable[[EpochEnd], None]] = []  # called after each epoch (the run's trackers)
        self.midtask = None  # a `clrun.midtask.MidTaskCheckpoints` when the run saves inside tasks

    @contextlib.contextmanager
    def status(self, label: str, doing: str):
        """Show a phase without training steps (e.g. a Fisher pass, an accuracy check) while it runs."""
        bar = None if self.progress is None else self.progress.add_task(label, total=None, info=doing)
        try:
            yield
        finally:
            if bar is not None:
                self.progress.remove_task(bar)

    def fit(
        self,
        module: torch.nn.Module,
        recipe,
        params: Iterable[torch.nn.Parameter],
        loss: Loss,
        data: tuple[torch.Tensor, ...],
        label: str,
        groups: Groups = (),
        after_backward: Callable[[Step, list[torch.optim.Optimizer]], None] | None = None,
        after_step: Callable[[Step], None] | None = None,
        after_epoch: Callable[[int], bool] | None = None,
        task: int | None = None,
        carry: dict | None = None,
        validate: Callable[[], float] | None = None,
    ) -> FitStats:
        """Train `params` of `module` under `recipe` (a `TrainConfig`: `epochs`, or exactly `iterations` steps,
        the last epoch then stopping part way) on `data` (uint8 images first, then aligned tensors, e.g. labels),
        the images of task `task` (None: of several tasks; per-task normalisation then refuses them).

        Each batch's images are augmented (when the stream is) and normalised on the device; `loss` is handed the
        float images, the batch's other tensors and the `Step`. `groups` are (params, OptimizerConfig) pairs with
        an optimizer and schedule of their own (e.g. masks under Adam beside weights under SGD). Hooks:
        `after_backward(step, optimizers)` before the optimizers step (e.g. to mask gradients; `optimizers[0]`
        holds `params`), `after_step(step)` after them, `after_epoch(epochs_done)` after each epoch (True stops).
        `carry` (parameter -> optimizer state): the state `params`' optimizer starts from and leaves, so that
        successive phases act as one optimizer (e.g. Adam's moments and step count across tasks). `validate()`:
        the validation accuracy, measured after each epoch when given (before `after_epoch`); a `plateau` schedule
        needs it and follows it (a decay after `patience` epochs without a gain; the phase stops one epoch after
        `max_decays` decays).
        """
        hooks = (loss, after_backward, after_step, after_epoch, validate)
        midtask = self.midtask
        if midtask is not None and (replayed := midtask.replay_finished(hooks, carry)) is not None:
            return FitStats(**replayed)
        hw = self.hw
        n = len(data[0])
        batches = -(-n // recipe.batch_size)
        iterations = recipe.get("iterations")
        epochs = -(-iterations // batches) if iterations else recipe.epochs
        total_steps = iterations or epochs * batches
        pairs = [(params, recipe), *groups]
        optimizers = [make_optimizer(group, group_cfg, hw) for group, group_cfg in pairs]
        plateau = None
        if recipe.schedule.value == "plateau":
            if validate is None:
                raise ValueError("a plateau schedule needs the phase's `validate`")
            plateau = Plateau(recipe.patience, recipe.max_decays)
        schedules = [
            make_schedule(opt, group_cfg, epochs, plateau)
            for opt, (_, group_cfg) in zip(optimizers, pairs, strict=True)
        ]
        if carry:
            _resume_state(optimizers[0], carry)
        progress = self.progress
        bar = None
        if progress is not None:
            bar = progress.add_task(label, total=total_steps, info=phase_info(1, epochs, math.nan, 0.0))
        shown = time.perf_counter()
        hw.compile(module)
        module.train()
        start, images, mean_loss, number, epochs_done = time.perf_counter(), 0, float("nan"), 0, 0
        macs_per_image = float("nan")
        resumed = None if midtask is None else midtask.resume_running(hooks, carry)
        if resumed is not None:  # the phase was saved at the end of epoch `epochs_done`: go on from there
            for optimizer, schedule, opt_state, schedule_state in zip(
                optimizers, schedules, resumed["optimizers"], resumed["schedules"], strict=True
            ):
                optimizer.load_state_dict(opt_state)
                schedule.load_state_dict(schedule_state)
            if plateau is not None:
                vars(plateau).update(resumed["plateau"])
            images, mean_loss, number = resumed["images"], resumed["mean_loss"], resumed["number"]
            epochs_done, macs_per_image = resumed["epochs_done"], resumed["macs_per_image"]
            start -= resumed["seconds"]
            if bar is not None:
                progress.update(bar, completed=number)
        for epoch in range(epochs_done, epochs):
            loss_sum = torch.zeros((), device=hw.device)
            first_bad = torch.full((), -1, device=hw.device)  # the first step whose loss is not finite (no sync)
            seen = 0
            for batch_index, batch in enumerate(iterate(data, recipe.batch_size, shuffle=True, device=hw.device)):
                if number == total_steps:
                    break
                step = Step(number, epoch, batch_index, batches, seen, n)
                x = hw.to_input(self.stream.prepare(batch[0], train=True, task=task))
                with MacCounter() if number == 0 else contextlib.nullcontext() as counter:
                    with hw.autocast():
                        value = loss(x, *batch[1:], step)
                    for optimizer in optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    value.backward()
                if number == 0:
                    macs_per_image = counter.macs / len(x)
                if after_backward is not None:
                    after_backward(step, optimizers)
                for optimizer in optimizers:
                    optimizer.step()
                number += 1
                if after_step is not None:
                    after_step(step)
                loss_sum += value.detach().float() * len(x)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(value.detach()), number - 1, first_bad)
                seen += len(x)
                if bar is not None:
                    progress.advance(bar)
                    if time.perf_counter() - shown > PROGRESS_SECONDS:  # the epoch's loss so far: one sync
                        shown = time.perf_counter()
                        info = phase_info(epoch + 1, epochs, loss_sum.item() / seen, (images + seen) / (shown - start))
                        progress.update(bar, info=info)
            stop = False
            if validate is not None:
                measured = validate()
                module.train()  # validate() evaluates in eval mode
                stop = plateau is not None and plateau.update(measured)
            for schedule in schedules:
                schedule.step()
            images += seen
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise ClrunError(
                    f"{label}: the training loss is not finite ({mean_loss}) from step {int(first_bad)} of the phase "
                    f"(epoch {epoch + 1}); tasks finished before it are kept: lower the learning rate and run again"
                )
            ips = images / (time.perf_counter() - start)
            if bar is not None:
                progress.update(bar, info=phase_info(epoch + 1, epochs, mean_loss, ips))
            epochs_done = epoch + 1
            for callback in self.epoch_callbacks:
                callback(EpochEnd(label, task, epochs_done, mean_loss, ips))
            if (after_epoch is not None and after_epoch(epochs_done)) or stop:
                break
            if midtask is not None and epochs_done < epochs and midtask.due(epochs_done):
                loop = {
                    "optimizers": [optimizer.state_dict() for optimizer in optimizers],
                    "schedules": [schedule.state_dict() for schedule in schedules],
                    "plateau": None if plateau is None else dict(vars(plateau)),
                    "images": images,
                    "mean_loss": mean_loss,
                    "number": number,
                    "epochs_done": epochs_done,
                    "macs_per_image": macs_per_image,
                    "seconds": time.perf_counter() - start,
                }
                midtask.save_running(hooks, carry, loop)
        if bar is not None:
            progress.remove_task(bar)  # the display keeps the run's bar and the running phase's
        if carry is not None:
            carry.update(optimizers[0].state)
        seconds = time.perf_counter() - start
        stats = FitStats(epochs_done, images, seconds, mean_loss, macs_per_image, macs_per_image * images)
        if midtask is not None:
            midtask.finished(hooks, carry, dataclasses.asdict(stats))
        return stats


def eval_batches(
    tensors: tuple[torch.Tensor, ...], stream: Stream, hw: Hardware, batch_size: int, task: int | None = None
):
    """Batches of `tensors` (uint8 images first, then any aligned rows) in order, the images (of task `task`;
    None: unknown) prepared as at test time (no augmentation)."""
    for x, *rest in iterate(tensors, batch_size, shuffle=False, device=hw.device):
        yield hw.to_input(stream.prepare(x, train=False, task=task)), *rest


@torch.no_grad()
def embed(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    stream: Stream,
    hw: Hardware,
    batch_size: int,
    task: int | None = None,
) -> torch.Tensor:
    """`forward`'s fp32 outputs (e.g. features) for uint8 `images` (of task `task`; None: unknown) prepared as at
    test time, in batches."""
    rows = []
    for (x,) in eval_batches((images,), stream, hw, batch_size, task):
        with hw.autocast():
            rows.append(forward(x).float())
    return torch.cat(rows)


@torch.inference_mode()
def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    split: Split,
    stream: Stream,
    hw: Hardware,
    batch_size: int,
    task: int | None = None,
) -> float:
    """Top-1 accuracy of `predict` (float images -> logits) on a split (of task `task`; None: unknown)."""
    correct = torch.zeros((), dtype=torch.long, device=hw.device)
    for x, y in eval_batches((split.x, split.y), stream, hw, batch_size, task):
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
    correct = torch.zeros((), dtype=torch.long, device=hw.device)
    right_task = torch.zeros((), dtype=torch.long, device=hw.device)
    inferring = False
    for x, y in eval_batches((split.x, split.y), stream, hw, batch_size):
        with hw.autocast():
            logits, inferred = predict(x)
        correct += (logits.argmax(1) == stream.targets(y, task)).sum()
        if inferred is not None:
            inferring = True
            right_task += (inferred == task).sum()
    return correct.item() / len(split), right_task.item() / len(split) if inferring else float("nan")


def verification(
    forward: Callable[[torch.Tensor], torch.Tensor],
    pairs: Pairs,
    stream: Stream,
    hw: Hardware,
    batch_size: int,
    task: int | None = None,
    n_folds: int = 10,
) -> tuple[float, float]:
    """Verification accuracy (mean, std over `n_folds` folds; `clrun.metrics.verification_accuracy`) of the cosine
    similarity between `forward`'s embeddings of each pair's two images (of task `task`), as CPG scores LFW."""
    embeddings = embed(forward, pairs.x, stream, hw, batch_size, task)
    similarity = torch.nn.functional.cosine_similarity(embeddings[pairs.a], embeddings[pairs.b], dim=1)
    mean, std, _ = verification_accuracy(similarity.double().cpu().numpy(), pairs.same.cpu().numpy(), n_folds)
    return mean, std
