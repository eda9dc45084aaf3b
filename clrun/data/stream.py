"""Task streams: an ordered list of tasks, each with uint8 images (on the device where they fit)."""

import hashlib
from dataclasses import dataclass, field

import torch

from clrun.data.batches import InputView, prepare


@dataclass
class Split:
    """Images and labels of one split of one task.

    `x` is uint8 (N, C, H, W) on the run's device, or in host memory when the stream's images do not fit
    there (batches are then copied in chunks; see `clrun.data.batches.iterate`); `y` is int64 (N,) with
    labels local to the task (0 .. n_classes-1), beside `x`.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Pairs:
    """The test split of a verification task: pair i compares images `x[a[i]]` and `x[b[i]]` (uint8, placed as a
    `Split`'s), `same[i]` whether they show one identity; pairs in their release's order (LFW: fold by fold)."""

    x: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    same: torch.Tensor

    def __len__(self) -> int:
        return len(self.same)


@dataclass
class Task:
    """One task of a stream: its index, a readable name, the global class ids it covers, and how many of its
    image files were skipped as corrupt (`data.skip_corrupt`). A verification task (face verification) trains on
    labelled identities and is tested on `Pairs`: `verification` says which. `val`: the images held out of the
    training images (`stream.val_fraction`), None without."""

    index: int
    name: str
    classes: list[int]
    train: Split
    test: Split | Pairs
    skipped: int = 0
    val: Split | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def verification(self) -> bool:
        """Whether the task is scored by verification pairs rather than by class."""
        return isinstance(self.test, Pairs)


@dataclass
class Stream:
    """An ordered list of tasks sharing one input view (the network's input shape, augmentation and
    normalisation), the scenario they are learned in (`task`, `class` or `domain`; see
    `clrun.config.Scenario`) and the device batches are prepared on."""

    name: str
    tasks: list[Task]
    input_shape: tuple[int, int, int]
    view: InputView
    scenario: str = "task"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.tasks)

    def prepare(self, x: torch.Tensor, train: bool, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """Network inputs from uint8 images (moved to the stream's device first), as `self.view` says: augmented
        when `train` and the stream augments, otherwise as at test time. `task`: the images' task (an index, or
        one per image; None: unknown, which per-task normalisation refuses)."""
        return prepare(x.to(self.device, non_blocking=True), self.view, train, task)

    def fingerprint(self) -> str:
        """A hash of the tasks' names, classes and tensors (their shapes and up to 2**16 evenly spaced values of
        each: cheap for any size, and any altered image or label changes it with near certainty): a resumed run
        checks it is learning the data it started on."""
        digest = hashlib.sha1()
        for task in self.tasks:
            digest.update(f"{task.name}{task.classes}".encode())
            for tensor in (*vars(task.train).values(), *vars(task.test).values()):
                flat = tensor.reshape(-1)
                sample = flat[:: max(1, len(flat) >> 16)]
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.cpu().numpy().tobytes())
        return digest.hexdigest()

    def class_offset(self, task: int) -> int:
        """Where task `task`'s classes start in the class scenario's one growing head."""
        return sum(t.n_classes for t in self.tasks[:task])

    def targets(self, y: torch.Tensor, task: torch.Tensor | int) -> torch.Tensor:
        """The labels the scenario's output expects: local labels, shifted by the task's offset in `class`."""
        if self.scenario != "class":
            return y
        if isinstance(task, int):
            return y + self.class_offset(task)
        offsets = torch.tensor([self.class_offset(k) for k in range(len(self.tasks))], device=y.device)
        return y + offsets[task]
