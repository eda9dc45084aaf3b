"""Individual models: an independent backbone and head per task, trained from scratch or, with
`start: random_earlier`, fine-tuned from the model of an earlier task drawn at random (`start: first`: from the
first task's model, as CPG's face baselines fine-tune every task from the face-verification model).

Task scenario; the class and domain scenarios with `task_id` (the model whose
head is most confident answers).

The "individual models" baselines of CPG's Table 2 (Hung et al., NeurIPS 2019) and the
sources of its accuracy goals: no forgetting, at T times the parameters. Scratch is
ivclab/CPG's experiment1/baseline_cifar100.sh; `random_earlier` its finetune_cifar100.sh
(five rounds give fine-Avg and fine-Max): task 1 from scratch, each later task from a copy of
a uniformly drawn earlier task's backbone (a fresh head) at `finetune_lr` (CPG: 5e-3), with
its other settings as `train`'s.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from omegaconf import OmegaConf

from clrun.config import POSITIVE, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskRecipeConfig, task_loss
from clrun.results import Footprint, count_params, module_bytes


class Start(Enum):
    """Where each task's model starts."""

    scratch = "scratch"  # a fresh backbone
    random_earlier = "random_earlier"  # from task 2 on: the backbone of an earlier task drawn uniformly
    first = "first"  # from task 2 on: the first task's backbone (CPG's face baselines: from the face model)


@dataclass
class ScratchConfig(PerTaskRecipeConfig):
    start: Start = Start.scratch
    # learning rate of the tasks started from an earlier model (null: train.lr)
    finetune_lr: Optional[float] = checked(POSITIVE, None)


class Scratch(Method):
    config_class = ScratchConfig
    starts_head_from_classifier = True
    scores_verification = True  # `new_model` gives a verification task a FaceHead, `task_loss` trains it

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.models = []

    def learn(self, task: Task) -> dict:
        cfg = self.task_cfg(task)
        model = self.new_model([task], scenario="task")
        source, recipe = -1, cfg.train
        if cfg.start is not Start.scratch and task.index > 0:
            source = 0
            if cfg.start is Start.random_earlier:  # the run's seeded RNG (tools/random_generate_task_id.py)
                source = int(torch.randint(task.index, ()))
            model.backbone.load_state_dict(self.models[source].backbone.state_dict())
            if cfg.finetune_lr is not None:
                recipe = OmegaConf.merge(recipe, {"lr": cfg.finetune_lr})
        self.models.append(model)
        stats = self.fit(task, model, model.parameters(), task_loss(model, 0, self.stream), recipe)
        return {**stats.row(), "source_task": source}

    def predict(self, x, task):
        model = self.models[task]
        model.eval()
        return model(x, 0)

    def embed(self, x, task):
        model = self.models[task]
        model.eval()
        return model.heads.embed(model.features(x), 0)

    def state_dict(self) -> dict:
        return {"models": [model.state_dict() for model in self.models]}

    def load_state_dict(self, state: dict) -> None:
        self.models = []
        for task, model_state in zip(self.stream.tasks, state["models"], strict=False):
            model = self.new_model([task], scenario="task")
            model.load_state_dict(model_state)
            self.models.append(model)

    def footprint(self) -> Footprint:
        return Footprint(
            params=sum(count_params(m) for m in self.models),
            bytes=sum(module_bytes(m) for m in self.models),
            base_params=count_params(self.models[0]),
        )
