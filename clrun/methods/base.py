"""The method contract: the `Method` base class, the config every method's config extends, and shared losses.

A method is one module under `clrun/methods/` (or any importable module of the user's) holding a `Method`
subclass and its config dataclass (`config_class`); see README, "Adding a method".
"""

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from clrun.config import AT_LEAST_1, checked, with_changes
from clrun.data.stream import Stream, Task
from clrun.errors import ClrunError
from clrun.hardware import Hardware
from clrun.models import TaskModel, build_backbone
from clrun.models.faces import FaceHead, angle_loss
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import FitStats, Groups, Loss, TrainConfig, Trainer, accuracy, verification


@dataclass
class MethodConfig:
    """Fields every method has; `_target_` names the class Hydra loads."""

    _target_: str = MISSING
    name: str = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = checked(AT_LEAST_1, 1000)


class TaskId(Enum):
    """How a method with per-task parts finds the task of an input when the scenario gives no task id."""

    none = "none"  # it does not: the method runs in the task scenario only
    confidence = "confidence"  # the task whose head gives the highest softmax probability
    entropy = "entropy"  # the task whose head gives the lowest softmax entropy


@dataclass
class PerTaskMethodConfig(MethodConfig):
    """A method with per-task parts (a head, mask or model per task): task-incremental unless `task_id` is set."""

    task_id: TaskId = TaskId.none


@dataclass
class PerTaskRecipeConfig(PerTaskMethodConfig):
    """A per-task method whose tasks may each have their own recipe (`Method.task_cfg` reads it)."""

    # changes to this config for single tasks, by task name or 1-based number (CPG's per-task learning rates, batch
    # sizes and margins), e.g. {stanford_cars_cropped: {train: {lr: 0.01}}}; any key of the method's config
    task_overrides: dict[str, Any] = field(default_factory=dict)


def task_loss(model: TaskModel, task: int, stream: Stream) -> Loss:
    """Cross-entropy of task `task`'s batches under the model's scenario, as a `fit` loss function:
    the task's head (task), every class seen so far with global labels (class), the shared head (domain); a
    verification task's `FaceHead`: A-Softmax (`angle_loss`, lambda counting the phase's steps)."""
    head = task if model.scenario == "task" else None
    offset = stream.class_offset(task) if model.scenario == "class" else 0
    if head is not None and isinstance(model.heads.heads[head], FaceHead):  # a verification task: A-Softmax

        def angular(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            return angle_loss(model.heads.heads[head].angular(model.features(x)), y, step.number + 1)

        return angular

    def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
        return F.cross_entropy(model(x, head), y + offset)

    return loss


def mixed_task_loss(model: TaskModel, stream: Stream, n_tasks: int) -> Loss:
    """Mean cross-entropy of a batch mixing tasks 0..n_tasks-1, each sample under its own task (`t`) as
    `task_loss` scores it; a `fit` loss function over (x, y, t) with no host sync."""

    def loss(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, step) -> torch.Tensor:
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
    """Base class of every method: holds its config, the backbone's config, the stream and the hardware, and a
    `Trainer` to train through (`fit`).

    Subclasses implement `learn`, `predict`, `state_dict`, `load_state_dict` and `footprint`, and name their
    config dataclass in `config_class`. This base is for methods with per-task parts: they run in the task
    scenario, and in the class and domain scenarios when their config's `task_id` rule picks the task of each
    input (`predict_agnostic`).
    """

    config_class: type = PerTaskMethodConfig  # the method's config dataclass (a subclass of MethodConfig)
    predicts_before_learning = False  # whether `predict_agnostic` works before the first task (FWT's baseline)
    starts_head_from_classifier = False  # whether task 0's head honours `backbone.imagenet_head` (`new_model` does)
    scores_verification = False  # whether it trains verification tasks' `FaceHead`s and implements `embed`

    def __init__(self, cfg, backbone_cfg, stream: Stream, hw: Hardware):
        self.cfg = cfg
        self.backbone_cfg = backbone_cfg
        self.stream = stream
        self.hw = hw
        self.trainer = Trainer(stream, hw)
        self.task_cfgs = {}  # task name -> its config (`task_overrides`), checked before any work
        names = [task.name for task in stream.tasks]
        for key, changes in cfg.get("task_overrides", {}).items():
            number = int(key) if str(key).isdigit() else 0
            if key not in names and not 1 <= number <= len(names):
                raise ClrunError(
                    f"method.task_overrides.{key}: no task of that name or 1-based number; tasks: {', '.join(names)}"
                )
            name = key if key in names else names[number - 1]
            self.task_cfgs[name] = with_changes(cfg, changes, f"method.task_overrides.{key}")

    def task_cfg(self, task: Task):
        """The method's config for `task`: `cfg` with the task's `task_overrides` merged in (`PerTaskRecipeConfig`)."""
        return self.task_cfgs.get(task.name, self.cfg)

    @classmethod
    def budget_key(cls) -> str | None:
        """The key under `method` that sizes the method's replay memory (images), which the run-level
        `replay.budget` sets; None for a method that keeps no memory. Default: `replay.budget` when the config
        has a `replay` field (a `ReplayConfig`)."""
        return "replay.budget" if "replay" in {f.name for f in fields(cls.config_class)} else None

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        """The scenarios this method runs in under config `cfg` (checked before the stream loads)."""
        if cfg.get("task_id") is not None and cfg.task_id.value != "none":
            return ("task", "class", "domain")
        return ("task",)

    def new_model(self, tasks: list[Task], scenario: str | None = None) -> TaskModel:
        """A freshly initialised backbone with heads for `tasks`, laid out for `scenario` (default: the
        stream's); in the domain scenario its one shared head exists from the start."""
        scenario = scenario or self.stream.scenario
        backbone = build_backbone(self.backbone_cfg, self.stream.input_shape)
        if tasks and tasks[0].index != 0:  # only the stream's task 0 starts from the pretrained classifier
            backbone.imagenet_head = None
        model = TaskModel(backbone, scenario)
        for task in self.stream.tasks[:1] if scenario == "domain" else tasks:
            model.add_head(task.n_classes, task.verification)
        return self.hw.prepare_model(model)

    def fit(
        self,
        task: Task,
        module: torch.nn.Module,
        params,
        loss: Loss,
        recipe=None,
        phase: str = "",
        data: tuple[torch.Tensor, ...] | None = None,
        groups: Groups = (),
        mixed: bool = False,
        carry: dict | None = None,
        **hooks,
    ) -> FitStats:
        """Train `params` of `module` with `loss` on `task`'s training images and labels (or `data`: `mixed` when
        its images come from several tasks) under `recipe` (default: `cfg.train`); `phase` names the phase in the
        progress display; `groups`, `carry` (optimizer state kept across phases) and the hooks (`after_backward`,
        `after_step`, `after_epoch`, `validate`) as `Trainer.fit` takes them. A plateau schedule's `validate`
        defaults to the task's test accuracy through `predict` (as CPG validates)."""
        label = f"task {task.index} {task.name}" + (f": {phase}" if phase else "")
        recipe = self.cfg.train if recipe is None else recipe
        if recipe.schedule.value == "plateau" and hooks.get("validate") is None:
            hooks["validate"] = lambda: self.test_accuracy(task)
        return self.trainer.fit(
            module,
            recipe,
            params,
            loss,
            (task.train.x, task.train.y) if data is None else data,
            label,
            groups,
            **hooks,
            task=None if mixed else task.index,
            carry=carry,
        )

    def test_accuracy(self, task: Task) -> float:
        """Accuracy of `predict` on the task's test split (`predict` puts the model in eval mode; `Trainer.fit`
        puts it back in train mode after its `validate`); of a verification task's pairs, the mean over their folds
        through `embed`."""
        if task.verification:
            embed = lambda x: self.embed(x, task.index)  # noqa: E731
            return verification(embed, task.test, self.stream, self.hw, self.cfg.eval_batch_size, task.index)[0]
        return accuracy(
            lambda x: self.predict(x, task.index), task.test, self.stream, self.hw, self.cfg.eval_batch_size, task.index
        )

    def learn(self, task: Task) -> dict:
        """Learn a new task; return per-task figures for `tasks.parquet` (see `FitStats.row`)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits over task `task`'s classes for a batch of prepared images (the task id is given)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Embeddings of prepared images under learned task `task`, for a verification task (`Task.verification`:
        its test pairs are compared by the cosine of these): its `FaceHead`'s embedding layer on the features."""
        raise ClrunError(f"method {self.cfg.name} cannot score verification tasks (`scores_verification` is false)")

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
        """What the method stores to predict every task learned so far."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Method-specific columns for summary.parquet (e.g. redundancy); none by default."""
        return {}


class SharedModelMethod(Method):
    """A method whose whole state is one `TaskModel` with heads laid out for the stream's scenario;
    it runs in every scenario."""

    config_class = MethodConfig
    starts_head_from_classifier = True
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

    def embed(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        return self.model.heads.embed(self.model.features(x), task)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "n_tasks": len(self.model.heads.heads)}

    def load_state_dict(self, state: dict) -> None:
        self.model = self.new_model(self.stream.tasks[: state["n_tasks"]])
        self.model.load_state_dict(state["model"])

    def footprint(self) -> Footprint:
        base = count_params(self.model.backbone) + count_params(self.model.heads.heads[0])
        return Footprint(params=count_params(self.model), bytes=module_bytes(self.model), base_params=base)
