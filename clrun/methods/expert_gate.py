"""Expert Gate (Aljundi, Chakravarty & Tuytelaars, CVPR 2017): an expert per task, chosen by autoencoder gates.

Each task gets an expert (a backbone with the task's head) and a gate: an
undercomplete autoencoder trained on the task's inputs. The paper's autoencoders
read a fixed pretrained trunk's features (AlexNet conv5); with no such trunk here,
they read the flattened normalised image squashed by a sigmoid (the paper's own
preprocessing of its features: standardise, then sigmoid), through ReLU(W x) and a
sigmoid decoder. At test, the gate with the lowest reconstruction error picks the
expert (the paper's softmax(-Er / t) has the same argmax for any temperature t),
so no task id is needed: the class and domain scenarios take that expert's logits.

A new task k first trains its gate, then measures each earlier gate a's error Er_a
on task k's training images; relatedness Rel_a = 1 - (Er_a - Er_k) / Er_k (paper).
The expert starts from the most related earlier expert's backbone (a fresh head;
from scratch for task 0) and is fine-tuned. The paper trains it with LwF when Rel
exceeds a threshold; here it is always fine-tuned, since earlier experts are kept
anyway and the LwF variant only shapes the new expert.

Every scenario; any backbone. Footprint: every expert and every autoencoder.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, MethodConfig, task_loss
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import TrainConfig, eval_batches


@dataclass
class ExpertGateConfig(MethodConfig):
    """Expert Gate (Aljundi et al. 2017): an expert per task, picked at test by per-task autoencoder gates."""

    # the gates choose the expert, so there is no `task_id` rule: it runs in every scenario
    latent: int = checked(AT_LEAST_1, 100)  # autoencoder code size (Avalanche's ExpertGate: 100)
    # autoencoder training: Adam lr 1e-3 (Avalanche), 2 epochs (Avalanche's ae_epochs)
    gate_train: TrainConfig = field(default_factory=TrainConfig)
    relatedness_init: bool = True  # start each expert from the most related earlier one (paper); false: from scratch


class Autoencoder(nn.Module):
    """The gate: sigmoid(x) -> ReLU(encoder) -> sigmoid(decoder); its error is the mean squared reconstruction
    error per image."""

    def __init__(self, n_inputs: int, latent: int):
        super().__init__()
        self.encoder = Linear(n_inputs, latent)
        self.decoder = Linear(latent, n_inputs)

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction error of each image of `x`, (N,)."""
        target = torch.sigmoid(x.flatten(1))
        reconstruction = torch.sigmoid(self.decoder(F.relu(self.encoder(target))))
        return (reconstruction - target).pow(2).mean(1)


class ExpertGate(Method):
    config_class = ExpertGateConfig
    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.experts = []
        self.gates = nn.ModuleList()
        self.relatedness: list[list[float]] = []  # per task, Rel of each earlier task

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class", "domain")

    def new_gate(self) -> Autoencoder:
        return self.hw.prepare_model(Autoencoder(math.prod(self.stream.input_shape), self.cfg.latent))

    @torch.no_grad()
    def gate_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Every gate's reconstruction error of each prepared image, (tasks, N)."""
        self.gates.eval()
        return torch.stack([gate.error(x) for gate in self.gates])

    def mean_errors(self, task: Task) -> torch.Tensor:
        """Every gate's mean reconstruction error over `task`'s training images, (tasks,)."""
        batches = eval_batches((task.train.x,), self.stream, self.hw, self.cfg.eval_batch_size, task.index)
        return sum(self.gate_errors(x).sum(1) for (x,) in batches) / len(task.train)

    def learn(self, task: Task) -> dict:
        gate = self.new_gate()
        self.gates.append(gate)

        def gate_loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            return gate.error(x).mean()

        gate_stats = self.fit(task, gate, gate.parameters(), gate_loss, self.cfg.gate_train, "gate")
        expert = self.new_model([task], scenario="task")
        rel, parent = [], None
        if task.index:
            errors = self.mean_errors(task)
            own = errors[-1]
            rel = (1 - (errors[:-1] - own) / own).tolist()
            if self.cfg.relatedness_init:
                parent = int(torch.argmax(torch.tensor(rel)))
                expert.backbone.load_state_dict(self.experts[parent].backbone.state_dict())
        self.relatedness.append(rel)
        self.experts.append(expert)
        row = self.fit(task, expert, expert.parameters(), task_loss(expert, 0, self.stream)).row()
        return {**row, "gate_loss": gate_stats.loss, "parent": -1 if parent is None else parent}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        expert = self.experts[task]
        expert.eval()
        return expert(x, 0)

    def infer_task(self, x: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """The expert whose gate reconstructs each image best answers."""
        return self.gate_errors(x)[: len(logits)].argmin(0)

    def summary(self) -> dict:
        """Mean relatedness of each task to its most related earlier one (tasks 1 on; NaN with one task)."""
        best = [max(rel) for rel in self.relatedness if rel]
        return {"relatedness": sum(best) / len(best) if best else float("nan")}

    def state_dict(self) -> dict:
        return {
            "experts": [expert.state_dict() for expert in self.experts],
            "gates": self.gates.state_dict(),
            "relatedness": self.relatedness,
        }

    def load_state_dict(self, state: dict) -> None:
        tasks = self.stream.tasks[: len(state["experts"])]
        self.experts = [self.new_model([task], scenario="task") for task in tasks]
        for expert, expert_state in zip(self.experts, state["experts"], strict=True):
            expert.load_state_dict(expert_state)
        self.gates = nn.ModuleList(self.new_gate() for _ in tasks)
        self.gates.load_state_dict(state["gates"])
        self.relatedness = state["relatedness"]

    def footprint(self) -> Footprint:
        """Every expert and every gate; the base is one expert (backbone and task 0's head)."""
        return Footprint(
            params=sum(count_params(m) for m in self.experts) + count_params(self.gates),
            bytes=sum(module_bytes(m) for m in self.experts) + module_bytes(self.gates),
            base_params=count_params(self.experts[0]),
        )
