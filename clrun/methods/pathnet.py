"""PathNet (Fernando et al. 2017): paths through layers of modules evolved by binary tournaments.

The network (`clrun.models.paths`) has `layers` layers of `modules` modules
(Linear + ReLU, `units` units); a path names `active` modules per layer, whose
outputs are summed. Each task starts a fresh population of `population` random
paths. One generation is one binary tournament: two paths drawn at random each
train for `train.iterations` minibatches (their unfrozen modules and the task's
readout), their fitness is their training accuracy over those batches, and the
loser's path is overwritten by a mutated copy of the winner's (each index
shifted with probability 1/(active x layers) by an integer in [-2, 2], modulo
`modules`). The task ends when a winner's fitness reaches `threshold` or after
`max_generations`; the last winner's modules are then frozen for good, every
other module is reinitialised, and the winner is the task's path at test.
`tasks.parquet` gets `generations` (the paper's measure) and `fitness`.

Task scenario (the task id picks the path and readout); class and domain with
`task_id`. Ignores `backbone`: the modules are PathNet's own MLP modules. The
paper's 50% salt-and-pepper noise on training images is not applied.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clrun.config import AT_LEAST_1, Rule, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models.layers import Linear
from clrun.models.paths import ModularNet
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import FitStats

SHIFT = 2  # a mutated index moves by an integer in [-SHIFT, SHIFT]


@dataclass
class PathNetConfig(PerTaskMethodConfig):
    """PathNet (Fernando et al. 2017): evolved paths through modules, the winner frozen after each task."""

    layers: int = checked(AT_LEAST_1, 3)  # L (binary MNIST: 3)
    modules: int = checked(AT_LEAST_1, 10)  # M, modules per layer (10)
    active: int = checked(AT_LEAST_1, 3)  # N, modules per layer on a path, repeats allowed (3)
    units: int = checked(AT_LEAST_1, 20)  # units per module (20)
    population: int = checked(Rule(lambda v: v >= 2, "at least 2"), 64)  # paths per task (64)
    threshold: float = checked(Rule(lambda v: 0 < v <= 1, "in (0, 1]"), 0.998)  # fitness that ends a task
    max_generations: int = checked(AT_LEAST_1, 200)  # tournaments per task at most


def mutate(path: torch.Tensor, modules: int) -> torch.Tensor:
    """A copy of `path` with each index shifted, with probability 1 / path.numel(), by U{-SHIFT..SHIFT} mod
    `modules`."""
    hit = torch.rand(path.shape) < 1 / path.numel()
    shift = torch.randint(-SHIFT, SHIFT + 1, path.shape)
    return (path + hit * shift) % modules


def tournament(
    population: torch.Tensor, fitness: Callable[[torch.Tensor], float], modules: int
) -> tuple[torch.Tensor, float]:
    """One binary tournament on `population` (P, L, N), in place: two random paths scored by `fitness` (ties go
    to the first drawn), the loser overwritten by a mutated copy of the winner. Returns the winner and its
    fitness."""
    a, b = torch.randperm(len(population))[:2].tolist()
    scores = fitness(population[a]), fitness(population[b])
    win, lose = (a, b) if scores[0] >= scores[1] else (b, a)
    population[lose] = mutate(population[win], modules)
    return population[win].clone(), max(scores)


class PathNet(Method):
    config_class = PathNetConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.net = self.new_net()
        self.paths: list[torch.Tensor] = []  # each learned task's path

    def new_net(self) -> ModularNet:
        cfg, (c, h, w) = self.cfg, self.stream.input_shape
        return self.hw.prepare_model(ModularNet(c * h * w, cfg.layers, cfg.modules, cfg.units))

    def add_head(self, task: Task) -> None:
        self.net.heads.append(self.hw.prepare_model(Linear(self.cfg.units, task.n_classes)))

    def train_path(self, task: Task, path: torch.Tensor, phases: list[FitStats]) -> float:
        """Train `path` on `task` for one tournament round; its fitness: training accuracy over those batches."""
        net, k, hits = self.net, task.index, []

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            logits = net(x, path, k)
            hits.append((logits.detach().argmax(1) == y).float())
            return F.cross_entropy(logits, y)

        params = net.trainable(path) + list(net.heads[k].parameters())
        phases.append(self.fit(task, net, params, loss))
        return torch.cat(hits).mean().item()

    def learn(self, task: Task) -> dict:
        cfg = self.cfg
        self.add_head(task)
        population = torch.randint(cfg.modules, (cfg.population, cfg.layers, cfg.active))
        progress, self.trainer.progress = self.trainer.progress, None  # one bar per task, not per tournament
        label = f"task {task.index} {task.name}: generations"
        if progress is not None:
            bar = progress.add_task(label, total=cfg.max_generations, info="")
        phases: list[FitStats] = []
        try:
            for _ in range(cfg.max_generations):
                path, fitness = tournament(population, lambda p: self.train_path(task, p, phases), cfg.modules)
                if progress is not None:
                    ips = sum(s.images for s in phases) / sum(s.seconds for s in phases)
                    progress.update(bar, advance=1, info=f"loss {phases[-1].loss:.4f} {ips:.0f} img/s")
                if fitness >= cfg.threshold:
                    break
        finally:
            self.trainer.progress = progress
            if progress is not None:
                progress.remove_task(bar)
        self.net.freeze(path)
        self.paths.append(path)
        return {**FitStats.total(phases).row(), "generations": len(phases) // 2, "fitness": fitness}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, self.paths[task], task)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "paths": self.paths}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.new_net()
        for task in self.stream.tasks[: len(state["paths"])]:
            self.add_head(task)
        self.net.load_state_dict(state["net"])
        self.paths = list(state["paths"])

    def footprint(self) -> Footprint:
        """The whole modular network (every module: later tasks train the unfrozen ones), its heads and paths;
        the base is the network with one head."""
        head = count_params(self.net.heads[0])
        base = count_params(self.net) - count_params(self.net.heads) + head
        return Footprint(
            params=count_params(self.net),
            bytes=module_bytes(self.net) + tensor_bytes(self.paths),
            base_params=base,
        )
