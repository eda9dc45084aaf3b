"""RCL, Reinforced Continual Learning (Xu & Zhu, NeurIPS 2018): an LSTM controller picks how many units each
layer gains per task.

Followed: xujinfan/Reinforced-Continual-Learning (RCL.py, evaluate.py, policy_gradient.py). Task 0 trains the
`backbone=mlp` network (the code: 784-312-128, `backbone.hidden=[312,128]`). Each later task gets a fresh
controller (`parts/controller.py`: a 2-layer LSTM of 100 units fed a fixed random state, one step per hidden
layer, each step a softmax over 0 .. `choices` - 1 units to add, step i > 0 also reading step i - 1's action) and
runs `episodes` trials (the code: 50): sample the additions, train a copy of the stored network on them
(`parts/unit_search.py`: the new units' incoming weights and biases, the weights from the new units of a layer
into the older units of the next, and a fresh head train; everything older stays put), reward = validation
accuracy - `penalty` x the units added (`cost=params`: x the parameters added), one REINFORCE step (baseline:
the code's critic, or `ema`). The best-reward network is kept; task t predicts through the units that existed
after it (the code's `stamps`), so earlier logits are bit-identical.

Budgets: `episodes` 5 and `train` 1 epoch per trial and for task 0 by default; the code runs 50 trials of 15
epochs (task 0: 10 epochs), batch 32, Adam 1e-3 with L2 1e-4 (here Adam's weight decay, which also decays the
biases).

Departures from the code: new units of the second layer train their incoming weights (the code's gradient mask
leaves them at their N(0, 0.01) initialisation and trains only their biases); the per-unit `transform` scales the
code trains and then discards are left out; step i > 0 reads the one-hot of the sampled action (the code feeds the
softmax); new units start from the pool's PyTorch initialisation and their weights into older units from 0 (the
code: N(0, 0.01), biases 0.1, a fresh N(0, 1) head). The reward's validation split is `validation` of the task's
training images (the code: MNIST's 5000-image validation set). Task scenario; class and domain with `task_id`.
"""

from dataclasses import dataclass, field
from enum import Enum

import torch

from clrun.config import AT_LEAST_1, Rule, checked
from clrun.data.stream import Task
from clrun.methods.parts.controller import Controller, ControllerConfig
from clrun.methods.parts.unit_search import Score, UnitSearchConfig, UnitSearchMethod
from clrun.models.units import FREE
from clrun.train import TrainConfig


class Cost(Enum):
    units = "units"  # the code: units added
    params = "params"  # parameters added


@dataclass
class RCLConfig(UnitSearchConfig):
    """RCL (Xu & Zhu 2018): units added per layer chosen by a REINFORCE-trained LSTM, old units frozen."""

    episodes: int = checked(AT_LEAST_1, 5)  # trials per task (the code: 50)
    choices: int = checked(Rule(lambda v: v >= 2, "at least 2"), 30)  # a layer gains 0 .. choices-1 units (30)
    cost: Cost = Cost.units  # what the penalty multiplies
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # the code: 2x100 LSTM, Adam 1e-3, critic
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=32, weight_decay=1e-4))


class RCL(UnitSearchMethod):
    config_class = RCLConfig
    cross = True

    def capacities(self, base: list[int]) -> list[int]:
        """Room for the most units every later task could add."""
        return [n + (self.cfg.choices - 1) * (len(self.stream.tasks) - 1) for n in base]

    def search(self, task: Task, score: Score) -> None:
        cfg, layers = self.cfg, len(self.base)
        controller = Controller(cfg.controller, cfg.choices, cfg.choices, feedback=True)
        tokens = torch.zeros(layers, cfg.choices)
        tokens[0] = torch.randn(cfg.choices)  # the fixed random state
        for episode in range(cfg.episodes):
            actions = controller.sample(tokens)
            new = [self.as_mask(i, self.free_units(i, int(a))) for i, a in enumerate(actions)]
            masks = [(o != FREE) | n for o, n in zip(self.net.owners, new, strict=True)]
            cost = int(actions.sum()) if cfg.cost.value == "units" else self.added_params(new, masks)
            reward = score(new, masks, cost, f"episode {episode + 1}/{cfg.episodes}: adds {actions.tolist()}")
            controller.reinforce(tokens, actions, reward)
