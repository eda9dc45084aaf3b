"""A replay memory (the "memory module" of a continual learner) and the loss that mixes it into training.

The memory holds at most `budget` training images of earlier tasks (uint8, on
the run's device) with their labels and task indices. It is filled after each
task: `reservoir` keeps every image seen so far with the same probability;
`class_balanced` splits the budget equally over every (task, class) seen, the
larger classes giving up images when a task adds classes; `herding` splits it
the same way but picks a new class's images by iCaRL's herding on the features
the method computes (its network after learning the task, in eval mode), and a
class giving up images keeps its best-ranked ones (iCaRL, DER); `per_task` gives
each of the stream's tasks budget // n_tasks slots, filled with a uniform sample of
its images (GEM's n_memories per task), and `per_task_class` splits each task's
slots equally over its classes (A-GEM's per-class ring buffers).
Batches mix the current task and the memory as van de Ven et al. do:
loss = (1/t) current + (1 - 1/t) replay, t the number of tasks so far.

`ImportanceMemory` (CCLIS) holds beside each image its importance weight, the probability-like weight its sampling
gave it, which the method's loss uses to correct for the non-uniform selection; the method picks what it holds.

`LogitMemory` is Dark Experience Replay's buffer (`dark_er`, `dark_er_pp`): filled batch by batch during
training by the same reservoir rule (`reservoir_slots`), each image with the logits the model gave it then;
`WeightedLogitMemory` adds a weight per row (GCR's weighted coreset, `gcr`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

from clrun.config import NON_NEGATIVE, NULL_OR_AT_LEAST_1, Rule, checked
from clrun.data.stream import Stream, Task
from clrun.hardware import Hardware
from clrun.methods.base import SharedModelMethod, mixed_task_loss
from clrun.models import TaskModel
from clrun.results import Footprint, tensor_bytes
from clrun.train import Loss, embed


class ReplayPolicy(Enum):
    reservoir = "reservoir"  # every training image seen so far has the same chance to be in memory
    class_balanced = "class_balanced"  # the budget is split equally over the classes seen so far
    herding = "herding"  # class_balanced, images picked by iCaRL's herding on the method's features after the task
    per_task = "per_task"  # budget // n_tasks slots per task of the stream, a uniform sample of its images (GEM)
    per_task_class = "per_task_class"  # per_task, each task's slots split equally over its classes (A-GEM)


@dataclass
class ReplayConfig:
    """A replay memory of at most `budget` training images (0: no replay), mixed into every batch."""

    budget: int = checked(Rule(NON_NEGATIVE.test, "non-negative (0: no replay)"), 0)
    policy: ReplayPolicy = ReplayPolicy.class_balanced
    # replayed images per batch (null: the training batch size)
    batch_size: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)


def herding(features: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of `n` rows of `features` in iCaRL's herding order (Rebuffi et al. 2017): rows L2-normalised, the k-th
    pick the row x maximising x . (k mu - S), i.e. bringing the mean of the picks closest to the mean mu of all
    rows (S: the sum of the earlier picks); each row at most once, ties to the lowest index."""
    rows = torch.nn.functional.normalize(features.float(), dim=1)
    mean = rows.mean(0)
    target = mean.clone()
    free = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    picks = []
    for _ in range(min(n, len(rows))):
        score = torch.where(free, rows @ target, -torch.inf)
        pick = int(score.argmax())
        picks.append(pick)
        free[pick] = False
        target += mean - rows[pick]
    return torch.tensor(picks, dtype=torch.long, device=features.device)


def reservoir_slots(seen: int, budget: int, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Reservoir sampling (Vitter's algorithm R; mammoth's utils/buffer.py `reservoir`) of `n` new examples offered
    in order after `seen` earlier ones to a memory of `budget` slots: the first `free` fill the empty slots in order;
    each later one, the c-th example seen, takes a slot drawn uniformly from [0, c) (torch's global RNG, CPU) and is
    kept if that slot is < budget, so after any number of offers every example seen is held with probability
    budget / seen. Returns `free` and, for the later examples kept, their indices among the `n` and their slots (CPU
    tensors); of examples drawing the same slot only the last is returned (the one a sequential write leaves)."""
    free = max(0, min(budget - seen, n))
    counts = seen + free + torch.arange(1, n - free + 1)  # examples seen when each later one arrives
    slots = (torch.rand(len(counts), dtype=torch.float64) * counts).long()  # uniform in [0, count)
    last = {}  # slot -> the last example drawing it
    for i, slot in zip(torch.nonzero(slots < budget).squeeze(1).tolist(), slots[slots < budget].tolist(), strict=True):
        last[slot] = free + i
    return free, torch.tensor(list(last.values()), dtype=torch.long), torch.tensor(list(last), dtype=torch.long)


class Memory:
    """At most `budget` stored images with labels `y` (local to their task) and task indices `t`."""

    stored = ("x", "y", "t")  # the tensors it holds: counted in the footprint, saved in the checkpoint

    def __init__(self, budget: int, policy: str, n_tasks: int = 1):
        self.budget = budget
        self.policy = policy
        self.per_task = budget // n_tasks  # the slots of each task under the per_task policies
        for name in self.stored:
            setattr(self, name, None)
        self.seen = 0  # training images offered so far (the reservoir's count)

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def add(self, task: Task, features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Offer the task's training images to the memory (`reservoir`, `class_balanced`: draws from torch's global
        RNG); `herding` needs `features`, mapping uint8 images to one feature row each (called only by it)."""
        x, y = task.train.x, task.train.y
        t = torch.full_like(y, task.index)
        if self.policy == "reservoir":
            self._reservoir(x, y, t)
        elif self.policy in ("per_task", "per_task_class"):
            self._task_slots(x, y, t, by_class=self.policy == "per_task_class")
        elif self.policy == "herding":
            if features is None:
                raise ValueError("the herding memory needs the features of the task's training images")
            self._balance(x, y, t, self._herd(y, t, features(x)))
        else:
            self._balance(x, y, t, torch.randperm(len(y)).to(y.device))

    def _herd(self, y: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The new images each class can keep (at most the largest quota once they are stored), class by class
        in herding order."""
        n_classes = len(set(zip(t.tolist(), y.tolist(), strict=True)))
        if len(self):
            n_classes += len(set(zip(self.t.tolist(), self.y.tolist(), strict=True)))
        quota = -(-self.budget // n_classes)
        order = []
        for label in y.unique().tolist():
            index = torch.nonzero(y == label).squeeze(1)
            order.append(index[herding(features[index], quota)])
        return torch.cat(order)

    def _reservoir(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        order = torch.randperm(len(y)).to(y.device)
        x, y, t = x[order], y[order], t[order]
        free, index, slots = reservoir_slots(self.seen, self.budget, len(y))
        if free:
            self._store(x[:free], y[:free], t[:free])
        if len(index):
            index, slots = index.to(y.device), slots.to(y.device)
            self.x[slots], self.y[slots], self.t[slots] = x[index], y[index], t[index]
        self.seen += len(y)

    def _balance(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, order: torch.Tensor) -> None:
        """Keep each (task, class)'s quota of the budget: its stored images first, then new ones in `order`."""
        offered = len(y)
        x, y, t = x[order], y[order], t[order]
        if len(self):
            x, y, t = torch.cat([self.x, x]), torch.cat([self.y, y]), torch.cat([self.t, t])
        classes = sorted(set(zip(t.tolist(), y.tolist(), strict=True)))
        quota = [self.budget // len(classes) + (k < self.budget % len(classes)) for k in range(len(classes))]
        keep = []
        for (task, label), n in zip(classes, quota, strict=True):
            keep.append(torch.nonzero((t == task) & (y == label)).squeeze(1)[:n])  # stored images first
        keep = torch.cat(keep)
        self.x = self.y = self.t = None
        self._store(x[keep], y[keep], t[keep])
        self.seen += offered

    def _task_slots(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, by_class: bool) -> None:
        """Fill the task's `per_task` slots with a uniform sample of its images (`by_class`: each class an equal
        share, the first classes one more when the slots do not divide); earlier tasks' images stay."""
        order = torch.randperm(len(y)).to(y.device)
        if by_class:
            labels = y.unique().tolist()
            quota = [self.per_task // len(labels) + (k < self.per_task % len(labels)) for k in range(len(labels))]
            keep = [order[y[order] == label][:n] for label, n in zip(labels, quota, strict=True)]
            keep = torch.cat(keep)
        else:
            keep = order[: self.per_task]
        if len(keep):
            self._store(x[keep], y[keep], t[keep])
        self.seen += len(y)

    def task_images(self, task: int) -> torch.Tensor:
        """Indices of the stored images of task `task`."""
        return torch.nonzero(self.t == task).squeeze(1)

    def batch(
        self, index: torch.Tensor, stream: Stream, hw: Hardware
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored images at `index`, prepared for training (augmented when the stream is), with their labels
        and tasks."""
        x = hw.to_input(stream.prepare(self.x[index], train=True, task=self.t[index]))
        return x, self.y[index], self.t[index]

    def _store(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        if self.y is None:
            self.x, self.y, self.t = x.clone(), y.clone(), t.clone()
        else:
            self.x, self.y, self.t = torch.cat([self.x, x]), torch.cat([self.y, y]), torch.cat([self.t, t])

    def sample(self, n: int, stream: Stream, hw: Hardware) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` stored images, drawn uniformly with replacement and prepared for training (augmented when the
        stream is), with their labels and tasks."""
        return self.batch(torch.randint(len(self), (n,)).to(self.y.device), stream, hw)

    def add_to(self, footprint: Footprint) -> Footprint:
        """A method's footprint plus every stored tensor (`stored`: images, labels, tasks, ...; bytes, not
        parameters)."""
        return footprint.plus(tensor_bytes(v for v in (getattr(self, n) for n in self.stored) if v is not None))

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.stored}, "seen": self.seen}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.seen = state["seen"]
        for name in self.stored:
            setattr(self, name, None if state[name] is None else state[name].to(device))

    def clear(self) -> None:
        """Hold nothing and start the reservoir's count again."""
        for name in self.stored:
            setattr(self, name, None)
        self.seen = 0


class LogitMemory(Memory):
    """Dark Experience Replay's buffer (mammoth's utils/buffer.py `Buffer`): at most `budget` training images, each
    with its label, task and the logits the model gave it when it was offered, filled batch by batch during
    training by reservoir sampling (`insert`), read by `draw` (without replacement, as mammoth's `get_data`)."""

    stored = ("x", "y", "t", "logits")

    def __init__(self, budget: int):
        super().__init__(budget, "reservoir")

    def add(self, task: Task, features=None) -> None:
        raise TypeError("a LogitMemory is filled batch by batch during training: use insert(x, y, t, logits)")

    def insert(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor) -> None:
        """Offer a batch of uint8 images `x` (labels `y`, tasks `t`) in order, with the model's `logits` for them
        (stored detached, as float32): reservoir sampling (`reservoir_slots`), one draw per image past the budget."""
        free, index, slots = reservoir_slots(self.seen, self.budget, len(y))
        logits = logits.detach().float()
        if free:
            self._store(x[:free], y[:free], t[:free])
            rows = logits[:free].clone()
            self.logits = rows if self.logits is None else torch.cat([self.logits, rows])
        if len(index):
            index, slots = index.to(y.device), slots.to(y.device)
            self.x[slots], self.y[slots], self.t[slots] = x[index], y[index], t[index]
            self.logits[slots] = logits[index]
        self.seen += len(y)

    def draw(self, n: int, stream: Stream, hw: Hardware) -> tuple[torch.Tensor, ...]:
        """min(n, held) stored rows drawn without replacement (torch's global RNG, CPU): their images prepared for
        training (augmented when the stream is), labels, tasks and stored logits."""
        index = torch.randperm(len(self))[:n].to(self.y.device)
        x = hw.to_input(stream.prepare(self.x[index], train=True, task=self.t[index]))
        return x, self.y[index], self.t[index], self.logits[index]


class WeightedLogitMemory(LogitMemory):
    """A `LogitMemory` whose rows also carry a non-negative weight `w` (GCR's weighted coreset), written whole by
    `keep` (a selection), never by reservoir sampling."""

    stored = ("x", "y", "t", "logits", "w")

    def insert(self, x, y, t, logits) -> None:
        raise TypeError("a WeightedLogitMemory holds a selection: use keep(x, y, t, logits, w)")

    def keep(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor, w: torch.Tensor) -> None:
        """Hold exactly these rows (at most `budget` of them) and their weights."""
        if len(y) > self.budget:
            raise ValueError(f"{len(y)} rows for a memory of {self.budget}")
        self.x, self.y, self.t, self.logits = x.clone(), y.clone(), t.clone(), logits.detach().float().clone()
        self.w = w.detach().float().clone()


class ImportanceMemory(Memory):
    """A memory whose images each carry an importance weight `w` (CCLIS: the image's score over the sum of its
    class's scores when it was sampled). The method chooses its contents (`replace`), at most `budget` images."""

    stored = ("x", "y", "t", "w")

    def __init__(self, budget: int):
        super().__init__(budget, "importance")

    def add(self, task: Task, features=None) -> None:
        raise TypeError("an ImportanceMemory is filled by its method's sampling: use replace(x, y, t, w)")

    def replace(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> None:
        """Hold exactly these images (labels local to their tasks `t`) with their weights `w` (float32)."""
        if len(y) > self.budget:
            raise ValueError(f"{len(y)} images offered to a memory of {self.budget}")
        self.seen += len(y)
        self.x = self.y = self.t = None
        self._store(x, y, t)
        self.w = w.detach().float().clone()


def with_replay(
    loss_fn: Loss, memory: Memory, model: TaskModel, stream: Stream, hw: Hardware, task: int, batch_size: int
) -> Loss:
    """`loss_fn` (a `fit` loss on task `task`'s batches) mixed with a replayed batch of `batch_size`:
    (1/t) current + (1 - 1/t) replay, t = task + 1; `loss_fn` itself while the memory is empty."""
    if not len(memory):
        return loss_fn
    replay_loss = mixed_task_loss(model, stream, task)
    current_weight = 1 / (task + 1)

    def loss(x: torch.Tensor, *rest) -> torch.Tensor:  # rest: the batch's other tensors, then the step
        replayed, y, t = memory.sample(batch_size, stream, hw)
        return current_weight * loss_fn(x, *rest) + (1 - current_weight) * replay_loss(replayed, y, t, rest[-1])

    return loss


class KeepsMemory:
    """Mixin of a shared-model method with a memory in `self.memory` (a `Memory`): saved in its state and counted in
    its footprint, after the base class's."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"], self.hw.device)

    def footprint(self) -> Footprint:
        return self.memory.add_to(super().footprint())


class Replaying(KeepsMemory, SharedModelMethod):
    """A shared-model method with the `replay` option (its config's `replay: ReplayConfig`): a memory of `budget`
    images (0: none), filled after each task, mixed into the task's loss, kept in the checkpoint and counted in the
    footprint."""

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.memory = Memory(cfg.replay.budget, cfg.replay.policy.value, len(stream.tasks))

    def replayed(self, loss_fn: Loss, task: int) -> Loss:
        """`loss_fn` on task `task`'s batches mixed with replayed ones (`with_replay`)."""
        batch_size = self.cfg.replay.batch_size or self.cfg.train.batch_size
        return with_replay(loss_fn, self.memory, self.model, self.stream, self.hw, task, batch_size)

    def replay_trainable(self, head: int) -> list[torch.nn.Parameter]:
        """What learning a task trains: as `TaskModel.trainable`, but every parameter (earlier heads included)
        once the memory replays earlier tasks."""
        return self.model.trainable(head) if not len(self.memory) else list(self.model.parameters())

    def remember(self, task: Task) -> None:
        """After learning `task`: offer its images to the memory (no RNG draw without replay)."""
        if self.cfg.replay.budget:
            self.memory.add(task, self.image_features)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features (eval mode) of uint8 images: what the `herding` policy ranks."""
        self.model.eval()
        return embed(self.model.features, images, self.stream, self.hw, self.cfg.eval_batch_size)
