"""Deep generative replay (DGR, Shin et al. 2017) and DGR+distill, as van de Ven's code runs them, in every scenario.

Followed: GMvandeVen/continual-learning's 2019 code (the three-scenario MNIST tables): `train.py` `train_cl`
(generative replay: the previous generator's samples, labelled by the previous classifier), `encoder.py`
`Classifier.train_a_batch` (the replay loss per scenario), `vae_models.py` `AutoEncoder` (the generator and its
loss, here `clrun.models.vae.VAE`).

Before each task after the first, frozen copies (eval mode, no gradients) of the classifier and of the generator
are taken. Every training step draws `replay_batch_size` images from the previous generator, labels them with the
previous classifier and trains on

    (1/t) L(current batch) + (1 - 1/t) L(replayed batch),   t the tasks so far,

for the classifier and, in the same step and with the same replayed images, for the generator (a VAE trained on
the current task's images and on its own copy's samples, with an optimizer of its own as in the reference).
The replayed batch's classification loss is per scenario:

- task: the replayed images are scored under every earlier task's head, each with its own targets (the previous
  classifier's argmax over that head, or its soft targets); the terms are averaged over the earlier tasks.
- class: the student's outputs over every class seen so far, targets from the previous classifier's outputs over
  the old classes (argmax; or soft targets with probability 0 for the new classes).
- domain: the shared head, targets from the previous classifier's shared head.

`distill: true` is DGR+distill: soft targets, the distillation of `clrun.methods.parts.distill` at `temperature`
(`kd_form`: `summed` by default, as `lwf`; `vdv2019` the 2019 code's reduction); false (DGR): hard targets,
cross-entropy against the previous classifier's most likely class (Shin et al.).

No image is stored: the footprint is the classifier plus the generator (the frozen copies are re-created from them
before each task). Departures: images stay in clrun's stream normalisation for the classifier (generated pixels are
normalised as the stream's are; per-task normalisation and per-task views are refused); a fresh optimizer per task
and per network (the 2019 code keeps one Adam for the run); the reported `train_loss` is the classifier's and the
generator's losses summed (their parameters are disjoint, so each trains on its own loss).
"""

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clrun.config import AT_LEAST_1, NULL_OR_AT_LEAST_1, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import MethodConfig, SharedModelMethod
from clrun.methods.parts.distill import KDForm, distillation
from clrun.models import TaskModel
from clrun.models.vae import VAE
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import Loss

NULL_OR_POSITIVE = Rule(lambda v: v > 0, "null or positive")


@dataclass
class DGRConfig(MethodConfig):
    """Deep generative replay: a VAE's samples, labelled by the previous classifier, replayed beside each task."""

    # soft targets (DGR+distill: the previous classifier's temperature-softmax); false: its argmax (DGR)
    distill: bool = False
    temperature: float = checked(POSITIVE, 2.0)  # distillation temperature T (van de Ven: 2)
    kd_form: KDForm = KDForm.summed
    # the generator's hidden units per encoder layer, mirrored in the decoder (van de Ven: 400, 400 on split MNIST;
    # 1000, 1000 on permuted MNIST)
    generator_hidden: list[int] = field(default_factory=lambda: [400, 400])
    z_dim: int = checked(AT_LEAST_1, 100)  # the generator's latent size (van de Ven: 100)
    generator_lr: Optional[float] = checked(NULL_OR_POSITIVE, None)  # the generator's rate (null: train.lr)
    # generated images per training step (null: the training batch size, as van de Ven)
    replay_batch_size: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)


class DGR(SharedModelMethod):
    config_class = DGRConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        if stream.view.task_stats is not None or stream.view.task_views is not None:
            raise ClrunError(
                "dgr's generated images have no task: per-task normalisation or views cannot prepare them; "
                "set stream.normalize and stream.task_views to shared ones"
            )
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.generator = self.new_generator()
        mean, std = (
            torch.tensor(v, dtype=torch.float32, device=stream.device)[:, None, None]
            for v in (stream.view.mean, stream.view.std)
        )
        self.pixel_mean, self.pixel_std = mean, std

    def new_generator(self) -> VAE:
        return self.hw.prepare_model(VAE(self.stream.input_shape, list(self.cfg.generator_hidden), self.cfg.z_dim))

    def frozen_copies(self) -> tuple[TaskModel, VAE]:
        """Frozen copies (eval mode, no gradients) of the classifier and the generator: what replays earlier tasks."""
        copies = copy.deepcopy(self.model).eval(), copy.deepcopy(self.generator).eval()
        for module in copies:
            module.requires_grad_(False)
        return copies

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs back to pixels in [0, 1] (what the generator models)."""
        return (x.float() * self.pixel_std + self.pixel_mean).clamp(0, 1)

    def to_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] to network inputs, normalised as the stream's images are."""
        return self.hw.to_input((pixels - self.pixel_mean) / self.pixel_std)

    def classification(self, features: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """Cross-entropy of the current task's batch under the scenario (as `task_loss`)."""
        if self.model.scenario == "task":
            return F.cross_entropy(self.model.logits(features, task), y)
        return F.cross_entropy(self.model.logits(features, None), self.stream.targets(y, task))

    def replay_loss(self, features: torch.Tensor, old: torch.Tensor, teacher: TaskModel, task: int) -> torch.Tensor:
        """The replayed batch's classification loss: the student's `features` against the previous classifier's
        outputs on its features `old`, hard or soft targets per scenario (module docstring)."""
        cfg, model = self.cfg, self.model

        def target_loss(student: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if cfg.distill:
                return distillation(student, scores, cfg.temperature, cfg.kd_form)
            return F.cross_entropy(student, scores.argmax(1))

        if model.scenario == "task":
            terms = [target_loss(model.logits(features, k), teacher.logits(old, k)) for k in range(task)]
            return sum(terms) / task
        logits = model.logits(features, None)
        scores = teacher.logits(old, None)
        if model.scenario == "class":  # the new classes: never the argmax, probability 0 as soft targets
            scores = F.pad(scores.float(), (0, logits.shape[1] - scores.shape[1]), value=-torch.inf)
        return target_loss(logits, scores)

    def dgr_loss(self, task: int, previous: tuple[TaskModel, VAE] | None) -> Loss:
        """A `fit` loss on task `task`'s batches: the classifier's and the generator's losses on the current batch,
        mixed (1/t, 1 - 1/t) with theirs on a batch generated by the previous generator (none before task 1)."""
        model, generator = self.model, self.generator
        replay_size = self.cfg.replay_batch_size or self.cfg.train.batch_size
        current_weight = 1 / (task + 1)

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            current = self.classification(model.features(x), y, task) + generator.loss(self.to_pixels(x))
            if previous is None:
                return current
            teacher, old_generator = previous
            pixels = old_generator.sample(replay_size)
            inputs = self.to_inputs(pixels)
            with torch.no_grad():
                old = teacher.features(inputs)
            replayed = self.replay_loss(model.features(inputs), old, teacher, task) + generator.loss(pixels)
            return current_weight * current + (1 - current_weight) * replayed

        return loss

    def learn(self, task: Task) -> dict:
        previous = self.frozen_copies() if task.index else None
        self.model.add_head(task.n_classes)
        recipe = self.cfg.train
        generator_recipe = (
            recipe if self.cfg.generator_lr is None else OmegaConf.merge(recipe, {"lr": self.cfg.generator_lr})
        )
        both = torch.nn.ModuleDict({"classifier": self.model, "generator": self.generator})
        stats = self.fit(
            task,
            both,
            self.model.parameters(),
            self.dgr_loss(task.index, previous),
            groups=[(self.generator.parameters(), generator_recipe)],
        )
        return stats.row()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator = self.new_generator()
        self.generator.load_state_dict(state["generator"])

    def footprint(self) -> Footprint:
        """The classifier plus the generator: no image is stored."""
        base = super().footprint()
        return Footprint(
            params=base.params + count_params(self.generator),
            bytes=base.bytes + module_bytes(self.generator),
            base_params=base.base_params,
        )
