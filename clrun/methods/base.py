"""The interface every continual-learning method implements."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clrun.data.stream import Stream, Task
from clrun.hardware import Hardware
from clrun.models import TaskModel, build_backbone
from clrun.train import fit


@dataclass
class Footprint:
    """What a method must store to predict every task learned so far."""

    params: int  # parameters stored
    bytes: int  # bytes stored: parameters, buffers, masks
    base_params: int  # parameters of one backbone with one head (the expansion ratio's denominator)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def task_loss(model: TaskModel, task: int):
    """Cross-entropy loss of one task's head, as a `fit` loss function."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x, task), y)

    return loss


class Method:
    """Base class: holds the config, the stream and the hardware; builds models.

    Subclasses implement `learn`, `predict`, `state_dict`, `load_state_dict`
    and `footprint`.
    """

    def __init__(self, cfg, backbone_cfg, stream: Stream, hw: Hardware):
        self.cfg = cfg
        self.backbone_cfg = backbone_cfg
        self.stream = stream
        self.hw = hw

    def new_model(self, tasks: list[Task]) -> TaskModel:
        """A freshly initialised backbone with one head per task in `tasks`."""
        model = TaskModel(build_backbone(self.backbone_cfg, self.stream.input_shape))
        for task in tasks:
            model.add_head(task.n_classes)
        return self.hw.prepare_model(model)

    def train_task(self, model: TaskModel, params, head: int, task: Task, progress) -> dict:
        """Train `params` on `task`'s data with the cross-entropy of `model`'s head `head`; return `FitStats.row()`."""
        stats = fit(
            model,
            params,
            task_loss(model, head),
            (task.train.x, task.train.y),
            self.cfg.train,
            self.stream,
            self.hw,
            progress,
            f"task {task.index} {task.name}",
        )
        return stats.row()

    def learn(self, task: Task, progress) -> dict:
        """Learn a new task; return per-task figures for `tasks.parquet` (see `FitStats.row`)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task `task` for a batch of prepared images."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything resuming after the last learned task needs."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def footprint(self) -> Footprint:
        raise NotImplementedError

    def summary(self) -> dict:
        """Method-specific columns for summary.parquet (e.g. redundancy); none by default."""
        return {}


class SharedModelMethod(Method):
    """A method whose whole state is one `TaskModel` with a head per learned task."""

    def __init__(self, cfg, backbone_cfg, stream: Stream, hw: Hardware):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([])

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        return self.model(x, task)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "n_tasks": len(self.model.heads.heads)}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]])
        self.model.load_state_dict(state["model"])

    def footprint(self) -> Footprint:
        base = count_params(self.model.backbone) + count_params(self.model.heads.heads[0])
        return Footprint(params=count_params(self.model), bytes=module_bytes(self.model), base_params=base)
