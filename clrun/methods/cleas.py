"""CLEAS, Continual Learning with Efficient Architecture Search (Gao, Luo, Klabjan & Zhang, arXiv 2006.04027): an
LSTM controller decides per neuron whether a task reuses an old one, drops it, or takes a new one.

Followed: gcooq/CLEAS (CLEAS_perm_v1.py, CLEAS_MLP.py). Each hidden layer is a pool of at most `pool` units (the
code: 1000); task 0 trains the `backbone=mlp` units (the code: 312 and 128, `backbone.hidden=[312,128]`). Each
later task gets a fresh controller (`parts/controller.py`: an LSTM of 32 units over one token per decision: the
one-hot of that neuron's decision in the previous episode, random in the first and, with probability `explore`
(0.3) drawn once per task, in every episode, and the one-hot of its layer). The decisions cover every unit some
task added (use: reused frozen, or drop: gated off for this task) and the next `max_new` (the code's `up_num`, 30)
free units of each layer (use: a new trainable unit reading the units the task uses below). Each of `episodes`
episodes (the code: 200) trains the candidate (`parts/unit_search.py`: the new units' incoming weights and biases
and a fresh head; the weights from new units into reused ones stay 0) and scores reward = validation accuracy -
`penalty` x the new units; the controller takes one REINFORCE step on it (baseline: a moving average of past
rewards). An episode adding no unit to some layer earns the controller reward -1 and restarts it (the code). The
best-reward candidate is kept; every task predicts through its own masks, so earlier logits are bit-identical.

Budgets: `episodes` 10 and `train` 300 iterations (batch 100) per episode and for task 0 by default; the code
trains 2000 iterations per episode, 9000 for task 0, Adam 1e-3 with L2 1e-4 (here Adam's weight decay).

Departures from the code: `decide=threshold` (the default, the code's p > 0.5) or `sample` (the paper); the
REINFORCE step uses the tokens that produced the actions (the code feeds the next episode's state) and a moving
average of past rewards (the code averages past advantages); new units are trained as units with their incoming
weights (the code's second-layer gradient mask multiplies mis-indexed gradients under a square root); the
controller's RMSProp learning rate is not decayed (the code: x0.96 every 500 episodes). MLP backbones only: the
code's CNN variant (CLEAS-C, filter sizes) is not implemented, and other backbones are refused. Task scenario;
class and domain with `task_id`.
"""

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F

from clrun.config import AT_LEAST_1, FRACTION, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.parts.controller import Baseline, Controller, ControllerConfig, ControllerOptimizer
from clrun.methods.parts.unit_search import Score, UnitSearchConfig, UnitSearchMethod
from clrun.models.units import FREE
from clrun.train import TrainConfig

USE = 1  # the controller's action for a neuron the task uses (0: drop / leave free)


class Decide(Enum):
    threshold = "threshold"  # the code: use when the controller's probability exceeds 0.5
    sample = "sample"  # the paper: draw each decision from the controller's probabilities


@dataclass
class CLEASConfig(UnitSearchConfig):
    """CLEAS (Gao et al. 2020): per-neuron reuse/drop/new decisions by a REINFORCE-trained LSTM, MLP only."""

    episodes: int = checked(AT_LEAST_1, 10)  # controller episodes per task (the code: 200)
    pool: int = checked(AT_LEAST_1, 1000)  # units a hidden layer can ever hold (the code: 1000)
    max_new: int = checked(AT_LEAST_1, 30)  # free units per layer a task may take (the code's up_num: 30)
    explore: float = checked(FRACTION, 0.3)  # chance that a task's controller reads random states every episode
    decide: Decide = Decide.threshold
    controller: ControllerConfig = field(
        default_factory=lambda: ControllerConfig(
            hidden=32, layers=1, optimizer=ControllerOptimizer.rmsprop, lr=0.01, baseline=Baseline.ema
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(iterations=300, batch_size=100, weight_decay=1e-4))


class CLEAS(UnitSearchMethod):
    config_class = CLEASConfig

    def capacities(self, base: list[int]) -> list[int]:
        """Each layer's pool, cut to what the stream's tasks could use."""
        if max(base) > self.cfg.pool:
            raise ClrunError(f"cleas: method.pool={self.cfg.pool} is smaller than task 0's {max(base)} units")
        return [min(self.cfg.pool, n + self.cfg.max_new * (len(self.stream.tasks) - 1)) for n in base]

    def search(self, task: Task, score: Score) -> None:
        cfg, layers = self.cfg, len(self.base)
        units = [((o != FREE).nonzero()[:, 0], self.free_units(i, cfg.max_new)) for i, o in enumerate(self.net.owners)]
        sizes = [len(old) + len(slots) for old, slots in units]
        where = F.one_hot(torch.repeat_interleave(torch.arange(layers), torch.tensor(sizes)), layers).float()
        controller = Controller(cfg.controller, 2 + layers, 2)
        explore = torch.rand(()).item() < cfg.explore
        actions = None
        for episode in range(cfg.episodes):
            state = torch.randint(2, (len(where),)) if actions is None or explore else actions
            tokens = torch.cat([F.one_hot(state, 2).float(), where], 1)
            actions = controller.sample(tokens, greedy=cfg.decide.value == "threshold")
            new, masks = [], []
            for i, ((old, slots), use) in enumerate(zip(units, (actions == USE).split(sizes), strict=True)):
                use = use.to(old.device)
                chosen = slots[use[len(old) :]]
                new.append(self.as_mask(i, chosen))
                masks.append(self.as_mask(i, torch.cat([old[use[: len(old)]], chosen])))
            added = [int(n.sum()) for n in new]
            reward = score(new, masks, sum(added), f"episode {episode + 1}/{cfg.episodes}: new units {added}")
            if min(added) == 0:
                controller.reset()
            controller.reinforce(tokens, actions, -1.0 if min(added) == 0 else reward)
