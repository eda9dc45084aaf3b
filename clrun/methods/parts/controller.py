"""An LSTM controller trained with REINFORCE, for the architecture searches of RCL and CLEAS.

The controller reads a sequence of tokens (one per decision) and gives each step a softmax over `options`.
With `feedback`, step i > 0 also reads the one-hot of the action taken at step i - 1 (RCL's autoregressive
controller: how many units layer i gains depends on what layer i - 1 gained). After an episode is scored,
`reinforce` takes one step on -(reward - baseline) * log pi(actions); the baseline is an exponential moving
average of the past rewards (`ema`) or a learned value (`critic`: RCL's value estimator on a fixed state,
i.e. one scalar regressed on the rewards). Each starts at 0, so the first episode's advantage is its reward, as
in both official codes. Weights start uniform in [-0.08, 0.08] (RCL's code).
"""

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, FRACTION, POSITIVE, checked


class Baseline(Enum):
    ema = "ema"  # exponential moving average of the past rewards (bias-corrected; 0 before the first)
    critic = "critic"  # a learned value, one scalar regressed on the rewards (RCL's code)


class ControllerOptimizer(Enum):
    adam = "adam"
    rmsprop = "rmsprop"


@dataclass
class ControllerConfig:
    """The controller's LSTM and its REINFORCE optimizer."""

    hidden: int = checked(AT_LEAST_1, 100)  # LSTM units
    layers: int = checked(AT_LEAST_1, 2)  # stacked LSTM layers
    optimizer: ControllerOptimizer = ControllerOptimizer.adam
    lr: float = checked(POSITIVE, 1e-3)
    baseline: Baseline = Baseline.critic
    decay: float = checked(FRACTION, 0.9)  # ema: weight of the past per episode
    critic_lr: float = checked(POSITIVE, 5e-3)  # critic: Adam's learning rate for the value


class Controller(nn.Module):
    """An LSTM policy over `input_size`-wide tokens with `options` actions per step, and its baseline."""

    def __init__(self, cfg, input_size: int, options: int, feedback: bool = False):
        super().__init__()
        if feedback and input_size != options:
            raise ValueError("feedback adds the previous action's one-hot to the token: input_size must be options")
        self.cfg, self.options, self.feedback = cfg, options, feedback
        self.lstm = nn.LSTM(input_size, cfg.hidden, cfg.layers)
        self.out = nn.Linear(cfg.hidden, options)
        self.value = nn.Parameter(torch.zeros(()))
        self.reset()

    def reset(self) -> None:
        """A fresh policy (uniform in [-0.08, 0.08]), optimizer and baseline."""
        policy = [*self.lstm.parameters(), *self.out.parameters()]
        with torch.no_grad():
            for p in policy:
                p.uniform_(-0.08, 0.08)
            self.value.zero_()
        optimizer = torch.optim.Adam if self.cfg.optimizer.value == "adam" else torch.optim.RMSprop
        self.optimizer = optimizer(policy, lr=self.cfg.lr)
        self.critic = torch.optim.Adam([self.value], lr=self.cfg.critic_lr)
        self.past, self.weight = 0.0, 0.0  # ema: discounted sum of rewards and of their weights

    def logits(self, tokens: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """(steps, options) logits for (steps, input_size) tokens; with feedback, given the actions taken."""
        inputs = tokens
        if self.feedback and actions is not None and len(actions) > 1:
            previous = F.one_hot(actions[:-1], self.options).to(tokens.dtype)
            inputs = torch.cat([tokens[:1], tokens[1:] + previous])
        return self.out(self.lstm(inputs[:, None])[0][:, 0])

    @torch.no_grad()
    def sample(self, tokens: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """One action per token: drawn from the policy, or its most probable one (`greedy`)."""

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1)[..., 0]

        if not self.feedback:
            return pick(self.logits(tokens))
        actions, state, previous = [], None, torch.zeros(self.options)
        for token in tokens:
            output, state = self.lstm((token + previous)[None, None], state)
            actions.append(pick(self.out(output[0, 0])))
            previous = F.one_hot(actions[-1], self.options).to(tokens.dtype)
        return torch.stack(actions)

    def log_prob(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(actions | tokens), summed over the steps."""
        return F.log_softmax(self.logits(tokens, actions), -1).gather(1, actions[:, None]).sum()

    def baseline(self) -> float:
        if self.cfg.baseline.value == "critic":
            return self.value.item()
        return self.past / self.weight if self.weight else 0.0

    def reinforce(self, tokens: torch.Tensor, actions: torch.Tensor, reward: float) -> float:
        """One REINFORCE step for the episode that took `actions` on `tokens` and earned `reward`; then the
        baseline learns the reward. Returns the advantage."""
        advantage = reward - self.baseline()
        self.optimizer.zero_grad()
        (-advantage * self.log_prob(tokens, actions)).backward()
        self.optimizer.step()
        if self.cfg.baseline.value == "critic":
            self.critic.zero_grad()
            ((self.value - reward) ** 2).backward()
            self.critic.step()
        decay = self.cfg.decay
        self.past, self.weight = decay * self.past + reward, decay * self.weight + 1
        return advantage
