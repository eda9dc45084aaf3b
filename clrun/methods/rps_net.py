"""RPS-Net: random path selection (Rajasegaran et al., NeurIPS 2019; arXiv 1906.01120 v3 "Adaptive RPS-Net").

Followed: brjathu/RPSnet (`rps_net.py` `RPS_net_mlp`, `learner.py`, `cifar.py`'s session loop, `MNIST.sh`).
The network (`clrun.models.paths.MaskedModularNet`) has layers of `modules` Linear modules (`widths`: the MNIST
code's 784-400-128) and one head over every class of the stream. A path is an (L, M) mask; each layer outputs
the ReLU of the sum of the modules on the inference path: the union of the frozen modules and the current path.

Per task s (0-based):
- Paths. Task 0 trains module 0 of every layer. Later, every `switch_every` (J) tasks the current path's modules
  are frozen for good (never trained again) and each candidate draws a new random path of `active` modules per
  layer (possibly reusing frozen ones, which stay frozen); between switches the path is kept and trains on.
- Search. `candidates` runs (the code's 8 parallel processes) each start from the model the task began with, take
  their path, train its unfrozen modules and the head through `fit`; the one scoring best on the validation
  images is kept, the others are discarded. The task's figures sum every candidate's training.
- Loss (the code's): cross-entropy over the classes seen so far + gamma_s KD, KD the sum over the batch and every
  class of max(0, p log(p / q)) / batch, q = softmax(student / T), p = softmax(target / T) with target the
  teacher's logits on the old classes and the one-hot label elsewhere (0/1 treated as logits, as in the code);
  the teacher is the model the task began with, run on the same inference path.
- Controller (the code's `rigidness_coff`): gamma_s = 1 for s <= J, `rigidness` (s - J) after.
- Memory: `memory` exemplars over the classes seen, mixed into the task's training set (`memory_repeat` times:
  the MNIST code tiles them 10x), picked by iCaRL's herding on the last layer's features (`memory_policy`).

Departures: the code picks the best candidate (and the best epoch) by *test* accuracy; here a candidate's score is
its accuracy over the classes seen on `val_fraction` of the task's training images held out from training, plus
the memory (0: the training images), and the last epoch is kept. The code's CIFAR memory is random and its MNIST
memory the first images of each class; herding is the paper's choice (iCaRL). The Adaptive version's path
saturation measure (switching when the used modules saturate) is not in the released code and is not implemented:
paths switch every J tasks. MLP modules only: `backbone` is ignored.

Scenarios: class (its own: one head, no task id); task (the same training, each task scored within its own
classes). Domain is refused: its tasks share their labels, so there are no old classes to distil.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, MethodConfig
from clrun.methods.parts.replay import Memory, ReplayPolicy
from clrun.models.paths import MaskedModularNet
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import FitStats, embed


@dataclass
class RPSNetConfig(MethodConfig):
    """RPS-Net (Rajasegaran et al. 2019): random paths through modules, the best of several kept, earlier paths
    frozen, exemplar replay with distillation scaled by a controller."""

    # units of each layer's modules (the MNIST code: 400, 128)
    widths: list[int] = checked(
        Rule(lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of positive widths"), factory=lambda: [400, 128]
    )
    modules: int = checked(AT_LEAST_1, 8)  # M, modules per layer (the code: 8)
    active: int = checked(AT_LEAST_1, 1)  # modules per layer on a new random path (the MNIST code: 1)
    candidates: int = checked(AT_LEAST_1, 8)  # random paths trained per task, the best kept (the code: 8 GPUs)
    switch_every: int = checked(AT_LEAST_1, 1)  # J: a new path every J tasks (the code's `jump`: 1)
    rigidness: float = checked(NON_NEGATIVE, 2.5)  # the controller's slope: gamma_s = rigidness (s - J) after J
    temperature: float = checked(POSITIVE, 2.0)  # KD temperature (the code: 2)
    memory: int = checked(NON_NEGATIVE, 2000)  # exemplars over the classes seen (CIFAR code: 2000; MNIST: 4400)
    memory_policy: ReplayPolicy = ReplayPolicy.herding  # how exemplars are picked (paper: herding)
    memory_repeat: int = checked(AT_LEAST_1, 1)  # copies of the memory in the training set (the MNIST code: 10)
    # share of the task's training images held out to pick the best candidate (0: pick on the training images)
    val_fraction: float = checked(FRACTION, 0.1)


def distillation_weight(task: int, switch_every: int, rigidness: float) -> float:
    """The controller's gamma for (0-based) task `task`: 1 up to task J, then `rigidness` x (task - J)."""
    return 1.0 if task <= switch_every else rigidness * (task - switch_every)


def random_path(layers: int, modules: int, active: int) -> torch.Tensor:
    """An (L, M) mask with `active` distinct modules per layer drawn uniformly (torch's global RNG)."""
    path = torch.zeros(layers, modules, dtype=torch.bool)
    for row in path:
        row[torch.randperm(modules)[:active]] = True
    return path


def distillation(logits: torch.Tensor, old: torch.Tensor, y: torch.Tensor, n_old: int, temperature: float):
    """RPS-Net's KD term: target = one-hot labels with the teacher's logits in the first `n_old` classes; the sum
    of the elementwise KL terms, each clamped at 0, over every class and sample, divided by the batch size."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    target[:, :n_old] = old[:, :n_old]
    terms = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(target / temperature, 1), reduction="none")
    return terms.clamp(min=0).sum() / len(y)


def joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) pairs concatenated into one."""
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


class RPSNet(Method):
    config_class = RPSNetConfig

    @classmethod
    def budget_key(cls) -> str:
        return "memory"

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if cfg.active > cfg.modules:
            raise ClrunError(f"method.active={cfg.active} is more than method.modules={cfg.modules}")
        self.n_classes = stream.class_offset(len(stream.tasks))
        self.net = self.new_net()
        layers = (len(cfg.widths), cfg.modules)
        self.fixed = torch.zeros(layers, dtype=torch.bool)  # frozen modules (earlier paths)
        self.path = torch.zeros(layers, dtype=torch.bool)  # the current path
        self.memory = Memory(cfg.memory, cfg.memory_policy.value, len(stream.tasks))
        self.search: list[tuple[torch.Tensor, float]] = []  # the last task's candidates: path, validation score

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class")

    def new_net(self) -> MaskedModularNet:
        c, h, w = self.stream.input_shape
        return self.hw.prepare_model(
            MaskedModularNet(c * h * w, list(self.cfg.widths), self.cfg.modules, self.n_classes)
        )

    @property
    def inference_path(self) -> torch.Tensor:
        return self.fixed | self.path

    def head_labels(self, y: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Task-local labels `y` of tasks `t` as the one head's labels (over the stream's every class)."""
        offsets = torch.tensor([self.stream.class_offset(k) for k in range(len(self.stream.tasks))], device=y.device)
        return y + offsets[t]

    def datasets(self, task: Task) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The training set (the task's images not held out + the memory, `memory_repeat` times) and the
        validation set (the held-out images, or the training images, + the memory), labels over every class."""
        x, y = task.train.x, self.head_labels(task.train.y, task.index)
        n_val = round(self.cfg.val_fraction * len(y))
        order = torch.randperm(len(y)).to(y.device)
        held, kept = order[:n_val], order[n_val:]
        train, val = [(x[kept], y[kept])], [(x[held], y[held]) if n_val else (x, y)]
        if len(self.memory):
            old = self.memory.x, self.head_labels(self.memory.y, self.memory.t)
            train += [old] * self.cfg.memory_repeat
            val.append(old)
        return joined(train), joined(val)

    def train_candidate(self, task, path, data, teacher, gamma, label) -> FitStats:
        """Train the unfrozen modules of `path` and the head on `data`; the teacher (if any) on the same path."""
        infer, n_old = self.fixed | path, self.stream.class_offset(task.index)
        seen, temperature = n_old + task.n_classes, self.cfg.temperature
        params = [p for m in self.net.picked(path & ~self.fixed) for p in m.parameters()]
        params += list(self.net.head.parameters())
        self.net.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            logits = self.net(x, infer)
            total = F.cross_entropy(logits[:, :seen], y)
            if teacher is None:
                return total
            with torch.no_grad():
                old = teacher(x, infer)
            return total + gamma * distillation(logits, old, y, n_old, temperature)

        return self.fit(task, self.net, params, loss, phase=label, data=data, mixed=True)

    def accuracy(self, path: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor], seen: int) -> float:
        """Accuracy over the first `seen` classes on labelled images, on the inference path of `path`."""
        self.net.eval()
        logits = embed(
            lambda x: self.net(x, self.fixed | path), data[0], self.stream, self.hw, self.cfg.eval_batch_size
        )
        return (logits[:, :seen].argmax(1) == data[1]).float().mean().item()

    def learn(self, task: Task) -> dict:
        cfg, k = self.cfg, task.index
        train, val = self.datasets(task)
        switching = k % cfg.switch_every == 0
        if k and switching:
            self.fixed |= self.path  # the finished path's modules never train again
        teacher = copy.deepcopy(self.net).eval() if k else None
        gamma = distillation_weight(k, cfg.switch_every, cfg.rigidness)
        seen = self.stream.class_offset(k) + task.n_classes
        start = {name: v.clone() for name, v in self.net.state_dict().items()}
        phases, self.search, best = [], [], None
        for c in range(cfg.candidates):
            self.net.load_state_dict(start)
            if k == 0:
                path = torch.zeros_like(self.path)
                path[:, 0] = True
            else:
                path = random_path(*self.path.shape, cfg.active) if switching else self.path.clone()
            phases.append(self.train_candidate(task, path, train, teacher, gamma, f"path {c + 1}/{cfg.candidates}"))
            score = self.accuracy(path, val, seen)
            self.search.append((path, score))
            if best is None or score > best[1]:
                best = (c, score, {name: v.clone() for name, v in self.net.state_dict().items()})
        chosen, score, state = best
        self.net.load_state_dict(state)
        self.path = self.search[chosen][0]
        if cfg.memory:
            self.memory.add(task, self.features)
        return {
            **FitStats.total(phases).row(),
            "chosen": chosen,
            "val_accuracy": score,
            "distillation_weight": gamma,
            "modules_used": int(self.inference_path.sum()),
        }

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last layer's features (eval mode) of uint8 images on the inference path: what herding ranks."""
        self.net.eval()
        forward = lambda x: self.net.features(x, self.inference_path)  # noqa: E731
        return embed(forward, images, self.stream, self.hw, self.cfg.eval_batch_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x, self.inference_path)

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        offset = self.stream.class_offset(task)
        return self.logits(x)[:, offset : offset + self.stream.tasks[task].n_classes]

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        return self.logits(x)[:, : self.stream.class_offset(seen)], None

    def summary(self) -> dict:
        """Share of the modules on the inference path."""
        return {"modules_used": float(self.inference_path.float().mean())}

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "fixed": self.fixed,
            "path": self.path,
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net = self.new_net()
        self.net.load_state_dict(state["net"])
        self.fixed, self.path = state["fixed"].clone(), state["path"].clone()
        self.memory.load_state_dict(state["memory"], self.hw.device)

    def footprint(self) -> Footprint:
        """The modules on the inference path (modules never on a path are untrained and not counted: they could
        be allocated when first drawn), the head, the masks and the memory; the base is one module per layer with a
        head over task 0's classes."""
        used = self.net.picked(self.inference_path)
        head = self.net.head
        base = sum(count_params(layer[0]) for layer in self.net.layers)
        base += (head.in_features + 1) * self.stream.tasks[0].n_classes
        footprint = Footprint(
            params=sum(count_params(m) for m in used) + count_params(head),
            bytes=sum(module_bytes(m) for m in used) + module_bytes(head) + tensor_bytes([self.fixed, self.path]),
            base_params=base,
        )
        return self.memory.add_to(footprint)
