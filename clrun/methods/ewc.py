"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018), as van de Ven et al.
run them (GMvandeVen/continual-learning), optionally with a replay memory.

The Fisher comes from the model's own predictions, in eval mode, per sample, on the task's output as
the scenario defines it, for the parameters trained on the task (heads included; in the task scenario
other heads have zero Fisher anyway). `fisher_labels: predicted` (default): F_i = mean_x (d log p(c*|x) /
d theta_i)^2 at the predicted class c*, as van de Ven's 2019 code (behind the published MNIST tables,
whose lambdas the presets use); `expectation`: F_i = mean_x sum_c p(c|x) (d log p(c|x) / d theta_i)^2,
his 2022 code's exact expectation (larger for confident models: lambda does not carry over). He divides
the sum by N-1 on a full pass; this takes the mean.

Offline (`online: false`): one penalty (lambda/2) sum_i F_j,i (theta_i - theta*_j,i)^2 per earlier task j.
Online: one running Fisher F <- gamma F + F_t anchored at the last task, and the penalty
(lambda/2) sum_i gamma F_i (theta_i - theta*_i)^2: Schwarz et al.'s published form
(||theta - theta*_{t-1}||^2 weighted by gamma F*_{t-1}), which van de Ven's code follows too.
"""

import torch
import torch.nn.functional as F

from clrun.data.stream import Task
from clrun.methods.base import task_loss
from clrun.methods.regularization import Regularization, Tensors, sample_mean
from clrun.methods.replay import Replaying


def log_probs_and_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and class, log p(c|x) and its weight p(c|x) in the Fisher's exact expectation over classes."""
    log_p = F.log_softmax(logits, dim=1)
    return log_p, log_p.detach().exp()


def predicted_log_prob(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, log p(c*|x) of the predicted class c* = argmax p(c|x), with weight 1."""
    log_p = F.log_softmax(logits, dim=1)
    best = log_p.gather(1, log_p.detach().argmax(1, keepdim=True))
    return best, torch.ones_like(best)


FISHER_OUTPUTS = {"expectation": log_probs_and_probs, "predicted": predicted_log_prob}


class EWC(Regularization, Replaying):
    @property
    def penalty_weight(self) -> float:
        return self.cfg.ewc_lambda / 2 * (self.cfg.gamma if self.cfg.online else 1.0)

    def loss(self, task: Task):
        """The task's loss mixed with replay as ER mixes it (the task's loss alone while the memory is empty)."""
        return self.replayed(task_loss(self.model, task.index, self.stream), task.index)

    def trained_parameters(self, head: int) -> list[torch.nn.Parameter]:
        return self.replay_trainable(head)

    def fisher(self, task: Task, names: list[str]) -> Tensors:
        """The diagonal Fisher of parameters `names` on `fisher_samples` of the task's training images."""
        images = self.sample_images(task, self.cfg.fisher_samples)
        outputs = FISHER_OUTPUTS[self.cfg.fisher_labels.value]
        return sample_mean(self.model, names, images, self.prepare, self.output_head(task), outputs, torch.square)

    def consolidate(self, task: Task, trained: dict[str, torch.nn.Parameter]) -> None:
        fisher = self.fisher(task, list(trained))
        if self.cfg.online and self.importance:
            running = self.importance[0]
            fisher = {n: f + self.cfg.gamma * running[n] if n in running else f for n, f in fisher.items()}
            fisher |= {n: self.cfg.gamma * f for n, f in running.items() if n not in fisher}
        params = dict(self.model.named_parameters())
        anchor = {n: params[n].detach().clone() for n in fisher}
        if self.cfg.online:
            self.importance, self.anchors = [fisher], [anchor]
        else:
            self.importance.append(fisher)
            self.anchors.append(anchor)
        self.remember(task)
