"""Dark Experience Replay's training (Buzzega et al., NeurIPS 2020), shared by `dark_er` (DER) and `dark_er_pp`
(DER++). Not to be confused with `der`, Yan et al.'s dynamically expandable representation.

Followed: aimagelab/mammoth, models/der.py and models/derpp.py (`observe`) and utils/buffer.py (`Buffer`,
`reservoir`, `get_data`). Each training step on a batch (x, y) of the current task:

    outputs = f(x)                        every output, over every class of the stream
    loss = CE(outputs, y)                 y: global labels
         + alpha * MSE(f(x'), z')        (x', z'): `replay.batch_size` buffer rows, images and stored logits
         + beta * CE(f(x''), y'')        DER++ only: a second, independent draw of buffer rows
    then the batch is offered to the buffer with `outputs` detached (the logits at insertion time: the same forward,
    before the optimizer step, as mammoth's `outputs.data`).

The buffer (`LogitMemory`) is a reservoir over every training image seen (each held with probability
budget / seen), filled during training, read without replacement; images are stored unaugmented (mammoth's
`not_aug_inputs`) and augmented when drawn. No 1/t weighting (unlike `er`). Every parameter trains, earlier heads
too. A fresh optimizer per task (`Trainer.fit`): under the default plain SGD, which keeps no state, the same as
one optimizer for the run. Defaults: mammoth's `best_args` for seq-MNIST at buffer 200 (SGD without
momentum, lr 0.03, batch 10, one epoch); see each method's config.

The output layer is mammoth's: every class of the stream from the start (class and task scenarios: every task's
head, created before the first task and concatenated; domain: the one shared head). The CE of current and DER++'s
buffer batches spans all of it with global labels, as mammoth's `self.loss(outputs, labels)`, and a stored row
holds the outputs of classes not yet trained, so the MSE also keeps those down on earlier images (a first
version adding heads per task and storing the logits of the classes seen ended split MNIST's class scenario
at 19.8%, as fine-tuning). The task scenario trains the same way and predicts
with the task's head, which is mammoth's Task-IL (the same model's logits masked to the task's classes).

Departure: in the class scenario a prediction after t tasks picks among the classes seen so far (clrun's class
scenario); mammoth's evaluation takes the argmax over every output. The two agree after the last task.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clrun.config import NON_NEGATIVE, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import MethodConfig, SharedModelMethod
from clrun.methods.parts.replay import KeepsMemory, LogitMemory, ReplayConfig, ReplayPolicy
from clrun.train import Optimizer, TrainConfig


@dataclass
class DarkReplayConfig(MethodConfig):
    """Dark Experience Replay: CE on the current batch + alpha * MSE between the model's logits on buffer images and
    the logits stored with them (a reservoir buffer of `replay.budget`, filled during training)."""

    # mammoth seq-MNIST (utils/best_args.py): SGD lr 0.03, batch 10, 1 epoch (MNISTMLP: backbone=mlp hidden=[100,100])
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer=Optimizer.sgd, lr=0.03, momentum=0.0, batch_size=10, epochs=1)
    )
    # the buffer (policy: reservoir only); batch_size: buffer rows per draw (mammoth's minibatch_size; null: batch)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=200, policy=ReplayPolicy.reservoir))
    alpha: float = checked(NON_NEGATIVE, 0.2)  # weight of the logit MSE (mammoth seq-MNIST, buffer 200: 0.2)


class DarkReplay(KeepsMemory, SharedModelMethod):
    """A shared model trained with Dark Experience Replay; `buffer_ce_weight` (DER++'s beta) adds the buffer's CE."""

    config_class = DarkReplayConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if cfg.replay.policy != ReplayPolicy.reservoir:
            raise ClrunError(
                f"method.replay.policy={cfg.replay.policy.value}: {cfg.name} fills its buffer during training by "
                "reservoir sampling only (policy: reservoir)"
            )
        self.model = self.new_model(stream.tasks)  # every task's head from the start (domain: the shared one)
        self.memory = LogitMemory(cfg.replay.budget)
        offsets = [stream.class_offset(k) if stream.scenario != "domain" else 0 for k in range(len(stream.tasks))]
        self.offsets = torch.tensor(offsets, device=hw.device)

    def buffer_ce_weight(self) -> float:
        """Weight of the cross-entropy on a second draw of buffer rows (DER++'s beta; DER: none)."""
        return 0.0

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every output of the model (what DER trains, stores and matches): every head concatenated, over every
        class of the stream (domain: the shared head)."""
        return self.head_outputs(self.model.features(x))

    def head_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """`outputs` from the backbone's features: the last layer only (GCR's selection differentiates it alone)."""
        if self.model.scenario == "domain":
            return self.model.logits(features, None)
        return torch.cat([head(features) for head in self.model.heads.heads], dim=1)

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        """The class scenario's prediction among the classes of the `seen` tasks learned; domain: the shared head."""
        self.model.eval()
        if self.model.scenario == "domain":
            return self.model(x, None), None
        return self.outputs(x)[:, : self.stream.class_offset(seen)], None

    def learn(self, task: Task) -> dict:
        alpha, beta = self.cfg.alpha, self.buffer_ce_weight()
        budget, offsets = self.cfg.replay.budget, self.offsets
        draw_size = self.cfg.replay.batch_size or self.cfg.train.batch_size

        def loss(x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, step) -> torch.Tensor:
            outputs = self.outputs(x)
            total = F.cross_entropy(outputs, y + offsets[task.index])
            if len(self.memory):
                replayed, _, _, stored = self.memory.draw(draw_size, self.stream, self.hw)
                total = total + alpha * F.mse_loss(self.outputs(replayed), stored)
                if beta:
                    replayed, labels, tasks, _ = self.memory.draw(draw_size, self.stream, self.hw)
                    total = total + beta * F.cross_entropy(self.outputs(replayed), labels + offsets[tasks])
            if budget:
                self.memory.insert(images, y, torch.full_like(y, task.index), outputs)
            return total

        # the images a second time, as they are stored (uint8, unaugmented): the loss gets them beside the prepared x
        data = (task.train.x, task.train.y, task.train.x)
        return self.fit(task, self.model, list(self.model.parameters()), loss, data=data).row()
