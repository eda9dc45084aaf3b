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


def task_loss(model: TaskModel, task: int, stream: Stream):
    """Cross-entropy of task `task`'s batches under the model's scenario, as a `fit` loss function:
    the task's head (task), every class seen so far with global labels (class), the shared head (domain)."""
    head = task if model.scenario == "task" else None
    offset = stream.class_offset(task) if model.scenario == "class" else 0

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x, head), y + offset)

    return loss


def mixed_task_loss(model: TaskModel, stream: Stream, n_tasks: int):
    """Mean cross-entropy of a batch mixing tasks 0..n_tasks-1, each sample under its own task (`t`) as
    `task_loss` scores it; a `fit` loss function over (x, y, t) with no host sync."""

    def loss(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = model.features(x)
        if model.scenario != "task":
            return F.cross_entropy(model.logits(features, None), stream.targets(y, t))
        total = features.new_zeros(())
        for k in range(n_tasks):
            logits = model.logits(features, k)
            per_sample = F.cross_entropy(logits, y.clamp(max=logits.shape[1] - 1), reduction="none")
            total = total + (per_sample * (t == k)).sum()
        return total / len(x)

    return loss


def identify_task(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Per sample, the task whose head is most confident (`confidence`: highest softmax probability;
    `entropy`: lowest softmax entropy), from each task's logits for the same inputs."""
    log_p = [F.log_softmax(task_logits.float(), dim=1) for task_logits in logits]
    if rule == "confidence":
        scores = torch.stack([lp.max(1).values for lp in log_p])
    else:
        scores = torch.stack([(lp.exp() * lp).sum(1) for lp in log_p])  # minus the entropy
    return scores.argmax(0)


class Method:
    """Base class: holds the config, the stream and the hardware; builds models.

    Subclasses implement `learn`, `predict`, `state_dict`, `load_state_dict`
    and `footprint`. This base is for methods with per-task parts: they run in
    the task scenario, and in the class and domain scenarios when their config's
    `task_id` rule picks the task of each input (`predict_agnostic`).
    """

    predicts_before_learning = False  # whether `predict_agnostic` works before the first task (FWT's baseline)

    def __init__(self, cfg, backbone_cfg, stream: Stream, hw: Hardware):
        self.cfg = cfg
        self.backbone_cfg = backbone_cfg
        self.stream = stream
        self.hw = hw

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        """The scenarios this method runs in under config `cfg`."""
        if cfg.get("task_id") is not None and cfg.task_id.value != "none":
            return ("task", "class", "domain")
        return ("task",)

    def new_model(self, tasks: list[Task], scenario: str | None = None) -> TaskModel:
        """A freshly initialised backbone with heads for `tasks`, laid out for `scenario` (default: the
        stream's); in the domain scenario its one shared head exists from the start."""
        scenario = scenario or self.stream.scenario
        model = TaskModel(build_backbone(self.backbone_cfg, self.stream.input_shape), scenario)
        for task in self.stream.tasks[:1] if scenario == "domain" else tasks:
            model.add_head(task.n_classes)
        return self.hw.prepare_model(model)

    def train_task(self, model: TaskModel, params, task: Task, progress, index: int | None = None) -> dict:
        """Train `params` on `task`'s data with `task_loss` of `model` for task `index` (default: the
        task's own index; 0 for a model of its own); return `FitStats.row()`."""
        stats = fit(
            model,
            params,
            task_loss(model, task.index if index is None else index, self.stream),
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
        """Logits over task `task`'s classes for a batch of prepared images (the task id is given)."""
        raise NotImplementedError

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits with no task id after learning tasks 0..seen-1: over every class seen (class scenario,
        global labels) or over the shared labels (domain); and each sample's inferred task (None if not inferred).

        Here: `infer_task` picks a task per sample and only that task's logits (from `predict`) are kept.
        """
        logits = [self.predict(x, task) for task in range(seen)]
        inferred = self.infer_task(x, logits)
        if self.stream.scenario == "domain":
            return torch.stack(logits)[inferred, torch.arange(len(x), device=x.device)], inferred
        rows = [
            torch.where((inferred == task)[:, None], task_logits, -torch.inf) for task, task_logits in enumerate(logits)
        ]
        return torch.cat(rows, dim=1), inferred

    def infer_task(self, x: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """Each sample's task, from its logits under every learned task's head: the `task_id` rule."""
        return identify_task(logits, self.cfg.task_id.value)

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
    """A method whose whole state is one `TaskModel` with heads laid out for the stream's scenario;
    it runs in every scenario."""

    predicts_before_learning = True

    def __init__(self, cfg, backbone_cfg, stream: Stream, hw: Hardware):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.model = self.new_model([])

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class", "domain")

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        return self.model(x, task)

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        self.model.eval()
        return self.model(x, None), None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "n_tasks": len(self.model.heads.heads)}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]])
        self.model.load_state_dict(state["model"])

    def footprint(self) -> Footprint:
        base = count_params(self.model.backbone) + count_params(self.model.heads.heads[0])
        return Footprint(params=count_params(self.model), bytes=module_bytes(self.model), base_params=base)
