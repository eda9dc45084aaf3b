"""Task streams: an ordered list of tasks, each with device-resident uint8 images."""

from dataclasses import dataclass

import torch


@dataclass
class Split:
    """Images and labels of one split of one task.

    `x` is uint8 (N, C, H, W) on the run's device; `y` is int64 (N,) with labels
    local to the task (0 .. n_classes-1).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Task:
    """One task of a stream: its index, a readable name, the global class ids it covers."""

    index: int
    name: str
    classes: list[int]
    train: Split
    test: Split

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Stream:
    """An ordered list of tasks sharing one input shape and one normalisation, and the scenario they are
    learned in: `task`, `class` or `domain` (see `clrun.config.Scenario`)."""

    name: str
    tasks: list[Task]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    scenario: str = "task"

    def __len__(self) -> int:
        return len(self.tasks)

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
